#!/usr/bin/env bash
# One command for the GPU check (benchmarks/gpu_check.py): opdplus at Qwen3-0.6B/1.7B sizes with random weights,
# bf16, vLLM rollouts, OPD+ jsd, beside TRL's DistillationTrainer; about 5-8 minutes on one H100/H200, no
# downloads. Needs opdplus installed with the vllm extra and TRL in the Python it runs (PYTHON, default: the
# repository's .venv when there is one, else python3). Extra arguments go to gpu_check.py (e.g. --steps 4).
# Writes benchmarks/results/gpu_check.json and logs in benchmarks/results/gpu_check_logs/; ends with ratio=.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" benchmarks/gpu_check.py "$@"
