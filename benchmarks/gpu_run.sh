#!/usr/bin/env bash
# The one prepared GPU run (device tool, one H100/H200): install the carried wheels,
# record the machine, run the recipe's path end to end (gpu_e2e.py), check and time
# the kernels, time training throughput. Everything lands in $OUT.
#
#   benchmarks/gpu_run.sh --check      # here, on CPU: wheels, arguments, time plan
#   benchmarks/gpu_run.sh --check-plan # the time plan only (E2E_STEPS=N for another budget)
#   run(command="COMMIT=$(git rev-parse --short HEAD) benchmarks/gpu_run.sh",
#       carry=[".whl"], timeout_s=580)
#
# Each stage has its own time limit, and a stage over its limit is killed with its
# whole process tree (torchrun's workers run in sessions of their own). The limits
# add up to TOTAL_S (under 9 minutes); a stage starts only with the time that is
# left. The e2e stage's limit is its stated budget (gpu_e2e.py: RunBudget, cold
# compilation first, then warm); --check checks that the limits fit TOTAL_S and that
# TOTAL_S plus a machine's start fits the 15-minute lease. Every stage shares one
# Inductor and one Triton cache folder (compile_caches), so what an earlier stage
# compiled is not compiled again. Results are written after every stage ($OUT/summary.md, and each stage's
# own log and JSON), so a timeout keeps what finished, and a failed stage does not
# stop the next. The script ends with the summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

TOTAL_S=530            # whole script; the device tool allows 600 s a command
LEASE_S=900            # device time of a session: 15 minutes, every start and wait counted
MACHINE_START_S=120    # a cold machine's start ("a minute or more"), out of the lease
PY_VERSION=3.12        # the GPU machine's python3
TORCH_ON_GPU=2.11.0    # its torch (and Triton 3.6)
TRITON_ON_GPU=3.6.0
E2E_STEPS=${E2E_STEPS:-20}

# name | limit (s) | command. gpu_run.sh --check parses each command's arguments.
STAGE_NAMES=(setup e2e kernels throughput)
E2E_S=$(python3 benchmarks/gpu_e2e.py --print-budget --steps "$E2E_STEPS") || exit 1
STAGE_LIMITS=(45 "$E2E_S" 90 150)
stage_cmd() {
    case "$1" in
        setup) echo "bash benchmarks/gpu_run.sh --setup" ;;
        e2e) echo "python3 benchmarks/gpu_e2e.py --out $OUT/e2e --steps $E2E_STEPS" ;;
        kernels) echo "python3 benchmarks/kernels.py --no-compile --out $OUT/kernels" ;;
        throughput) echo "python3 benchmarks/throughput.py --out $OUT/throughput \
--configs stock,bf16+kernels,fp8+kernels --steps 8 --warmup 3 --no-profile --timeout 45" ;;
    esac
}

compile_caches() {  # one Inductor and one Triton cache for every stage (gpu_e2e.py's)
    eval "$(python3 benchmarks/gpu_e2e.py --print-caches)"
}

kill_tree() {  # pid: SIGKILL it and every descendant (setsid keeps the parent id)
    python3 benchmarks/proctree.py kill "$1" 2>/dev/null || kill -KILL "$1" 2>/dev/null
}

summary_row() {
    printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >> "$OUT/summary.md"
}

run_stage() {  # name limit command...
    local name=$1 limit=$2; shift 2
    local left=$(( TOTAL_S - SECONDS ))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        summary_row "$name" "skipped" "-" "no time left"
        return
    fi
    echo "== $name (limit ${limit} s)"
    local begin=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1 &
    local pid=$! status=""
    while kill -0 "$pid" 2>/dev/null; do
        if (( SECONDS - begin >= limit )); then
            kill_tree "$pid"
            status="timeout"
            break
        fi
        sleep 1
    done
    wait "$pid"
    local rc=$?
    [[ -z $status ]] && status=$([[ $rc == 0 ]] && echo ok || echo "failed")
    tail -n 25 "$OUT/$name.log"
    summary_row "$name" "$status" "$rc" "$(( SECONDS - begin )) s"
}

setup() {  # install the carried wheels and record the machine (a stage of its own)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || return 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 - <<'PY'
import torch, triton, torchtitan, torchao, datasets, tiktoken
import swallow_titan
print(f"torch {torch.__version__} cuda {torch.version.cuda} triton {triton.__version__} "
      f"torchtitan {torchtitan.__version__} torchao {torchao.__version__} "
      f"datasets {datasets.__version__} device {torch.cuda.get_device_name()} "
      f"swallow_titan device {swallow_titan.DEVICE_TYPE}")
PY
}

check_wheels() {  # scratch folder: every wheel present once, installs for the GPU's Python
    local failed=0 scratch=$1
    echo "== wheels (.whl/, for Python $PY_VERSION, torch $TORCH_ON_GPU)"
    for req in $(grep -v '^#' benchmarks/gpu_wheels.txt); do
        local name=${req%%==*} count
        count=$(ls .whl 2>/dev/null | grep -ic "^${name//-/_}-[0-9]")
        if [[ $count != 1 ]]; then
            echo "  $name: $count wheels in .whl/ (need exactly 1; run benchmarks/fetch_wheels.sh)"
            failed=1
        fi
    done
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: \
            --python-version "$PY_VERSION" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform any --target "$scratch/site" .whl/*.whl; then
        echo "  the wheels do not install for Python $PY_VERSION"; failed=1
    fi
    python3 - "$scratch/site" "$TORCH_ON_GPU" "$TRITON_ON_GPU" <<'PY' || failed=1
import sys
from importlib.metadata import PathDistribution
from pathlib import Path
from packaging.requirements import Requirement
site, on_gpu = Path(sys.argv[1]), {"torch": sys.argv[2], "triton": sys.argv[3]}
bad = 0
for info in sorted(site.glob("*.dist-info")):
    dist = PathDistribution(info)
    for text in dist.requires or []:
        req = Requirement(text)
        if req.name in on_gpu and (req.marker is None or req.marker.evaluate({"extra": ""})):
            ok = req.specifier.contains(on_gpu[req.name], prereleases=True)
            print(f"  {dist.metadata['Name']} {dist.version} requires {req}: "
                  f"{'ok' if ok else 'NOT'} with {req.name} {on_gpu[req.name]}")
            bad += not ok
print(f"  {len(list(site.glob('*.dist-info')))} wheels installed into a scratch folder")
sys.exit(bad > 0)
PY
    return $failed
}

check() {  # on CPU, before a lease: wheels (unless $1 = no-wheels / plan), arguments, time plan
    local failed=0 scratch
    scratch=$(mktemp -d)
    [[ ${1:-} == no-wheels || ${1:-} == plan ]] || check_wheels "$scratch" || failed=1
    OUT="$scratch/out"
    compile_caches
    [[ ${1:-} == plan ]] || echo "== arguments"
    for name in "${STAGE_NAMES[@]}"; do
        [[ ${1:-} == plan ]] && break
        [[ $name == setup ]] && continue
        # shellcheck disable=SC2046
        if $(stage_cmd "$name") --parse-only > "$scratch/$name.txt" 2>&1; then
            echo "  $name: ok"
        else
            echo "  $name: $(tail -n 3 "$scratch/$name.txt")"; failed=1
        fi
    done
    echo "== compile caches (every stage)"
    echo "  TORCHINDUCTOR_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR"
    echo "  TRITON_CACHE_DIR=$TRITON_CACHE_DIR"
    echo "== time plan"
    local total=0
    for limit in "${STAGE_LIMITS[@]}"; do total=$(( total + limit )); done
    echo "  stages ${STAGE_NAMES[*]}: ${STAGE_LIMITS[*]} = ${total} s (e2e: $E2E_STEPS steps," \
         "gpu_e2e.py's budget); script limit ${TOTAL_S} s (< 540 s, device 600 s)"
    echo "  lease: machine start ${MACHINE_START_S} s + script ${TOTAL_S} s" \
         "= $(( MACHINE_START_S + TOTAL_S )) s of ${LEASE_S} s"
    (( total <= TOTAL_S && TOTAL_S <= 540 && MACHINE_START_S + TOTAL_S <= LEASE_S )) \
        || { echo "  does not fit"; failed=1; }
    rm -rf "$scratch"
    (( failed == 0 )) && echo "check: ok" || echo "check: FAILED"
    return $failed
}

case "${1:-}" in
    --check) check; exit $? ;;
    --check-no-wheels) check no-wheels; exit $? ;;  # CI: no wheels there
    --check-plan) check plan; exit $? ;;  # the time plan and caches only
    --setup) setup; exit $? ;;
esac

OUT="${OUT:-outputs/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="/tmp/site:$REPO"
compile_caches
exec > >(tee "$OUT/gpu_run.log") 2>&1
echo "commit ${COMMIT:-unknown}, $(date -u +%Y-%m-%dT%H:%MZ)"
printf '| stage | result | exit | time |\n|---|---|---|---|\n' > "$OUT/summary.md"
for i in "${!STAGE_NAMES[@]}"; do
    name=${STAGE_NAMES[$i]}
    # shellcheck disable=SC2046
    run_stage "$name" "${STAGE_LIMITS[$i]}" $(stage_cmd "$name")
done
echo "== summary (${SECONDS} s)"
cat "$OUT/summary.md"
