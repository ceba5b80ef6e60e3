#!/usr/bin/env bash
# The one prepared GPU run (device tool, nvidia-h100-x1 or nvidia-h200): install the
# carried wheels, record the machine, check the kernels in bf16, time the kernels and
# the training throughput. Everything lands in $OUT.
#   run(command="COMMIT=$(git rev-parse --short HEAD) benchmarks/gpu_run.sh", carry=[".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_run.log") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"

echo "== machine (commit ${COMMIT:-unknown}, $(date -u +%Y-%m-%dT%H:%MZ))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'PY' || exit 1
import torch, triton, torchtitan, torchao, datasets, tiktoken
import swallow_titan
print(f"torch {torch.__version__} cuda {torch.version.cuda} triton {triton.__version__} "
      f"torchtitan {torchtitan.__version__} torchao {torchao.__version__} "
      f"datasets {datasets.__version__} device {torch.cuda.get_device_name()} "
      f"swallow_titan device {swallow_titan.DEVICE_TYPE}")
PY

if [[ -f benchmarks/kernels.py ]]; then
    echo "== kernels"
    timeout 150 python3 benchmarks/kernels.py --out "$OUT" || echo "kernels benchmark failed ($?)"
fi

echo "== throughput"
timeout 420 python3 benchmarks/throughput.py --out "$OUT" --timeout 150 || echo "throughput failed ($?)"
