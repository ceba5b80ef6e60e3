#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels the GPU machine lacks, into .whl/
# (git-ignored). The device machine has torch 2.11, triton 3.6, tiktoken, tensorboard,
# safetensors, transformers, pyarrow, fsspec, huggingface-hub, but no torchtitan,
# torchao, torchdata, tyro or datasets, and it cannot reach PyPI.
#   benchmarks/fetch_wheels.sh && <device run with carry [".whl"]> benchmarks/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
exclude="$(git rev-parse --git-path info/exclude)"  # also in a worktree
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
PY_VERSION="${PY_VERSION:-3.12}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64 --platform any)
for req in $(grep -v '^#' benchmarks/gpu_wheels.txt); do
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "$PY_VERSION" --implementation cp "${PLATFORMS[@]}" -d .whl "$req"
done
ls -1 .whl
