#!/usr/bin/env bash
# Install swallow-titan with its test tools.
#
# Uses the active virtual/conda environment if there is one (a GPU machine's
# CUDA torch is kept), otherwise creates .venv here. torch is installed only if
# missing, as torch==$TORCH_VERSION (default 2.13.0; on this project's CPU
# machines that is a local CPU build, so no multi-GB CUDA download).
set -euo pipefail
cd "$(dirname "$0")"

if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" ]]; then
    [[ -d .venv ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi

if python -c "import torch" 2>/dev/null; then
    echo "setup.sh: keeping installed torch $(python -c 'import torch; print(torch.__version__)')"
else
    python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
python -m pip install --quiet -e ".[test]"
python -c "import swallow_titan, torch, torchtitan; print(f'setup.sh: swallow-titan {swallow_titan.__version__} on torch {torch.__version__}, device {swallow_titan.DEVICE_TYPE}')"
