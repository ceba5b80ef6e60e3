#!/usr/bin/env bash
# Launch swallow-titan training with torchrun.
#
#   ./run_train.sh CONFIG.toml [--section.key value ...]
#
# Environment:
#   NGPU          processes per node (default: visible GPUs, or 1 on a CPU machine)
#   NNODES        number of nodes (default 1)
#   NODE_RANK     this node's rank (default 0; ignored with RDZV_ENDPOINT)
#   MASTER_ADDR   rank-0 host (default localhost)
#   MASTER_PORT   rank-0 port (default 29500; a single node without it picks a free port)
#   RDZV_ENDPOINT host:port of a c10d rendezvous (multi-node, e.g. under SLURM);
#                 replaces MASTER_ADDR/MASTER_PORT/NODE_RANK
#   RDZV_ID       rendezvous job id (default: $SLURM_JOB_ID or "swallow")
#   PYTHON        python interpreter (default: python)
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
    exit 0
fi
CONFIG="$1"
shift
if [[ ! -f "$CONFIG" ]]; then
    echo "run_train.sh: config file not found: $CONFIG" >&2
    exit 2
fi

PYTHON="${PYTHON:-python}"
if [[ -z "${NGPU:-}" ]]; then
    NGPU=$("$PYTHON" -c 'from swallow_titan.runtime.device import default_ngpu; print(default_ngpu())')
fi
NNODES="${NNODES:-1}"

# Where this run writes (the same resolution the trainer does, overrides included).
"$PYTHON" -m swallow_titan.plan "$CONFIG" --ngpu "$NGPU" --nnodes "$NNODES" --outputs "$@" || exit $?

if [[ "$NNODES" == 1 && -z "${RDZV_ENDPOINT:-}" && -z "${MASTER_PORT:-}" ]]; then
    # One node: let torchrun find a free local port.
    LAUNCH=(--standalone --nproc_per_node "$NGPU")
elif [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    LAUNCH=(--nnodes "$NNODES" --nproc_per_node "$NGPU"
            --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT"
            --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-swallow}}")
else
    LAUNCH=(--nnodes "$NNODES" --nproc_per_node "$NGPU"
            --node_rank "${NODE_RANK:-0}"
            --master_addr "${MASTER_ADDR:-localhost}"
            --master_port "${MASTER_PORT:-29500}")
fi

# On SIGTERM (SLURM pre-emption) torchrun forwards the signal and SIGKILLs the
# workers after this many seconds; they need it to finish the step and write a
# checkpoint (torch's default is 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

# One CPU thread per process unless told otherwise.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))}"

exec "$PYTHON" -m torch.distributed.run "${LAUNCH[@]}" \
    --local-ranks-filter "${LOG_RANK:-0}" --role rank --tee 3 \
    -m swallow_titan.train --job.config_file "$CONFIG" "$@"
