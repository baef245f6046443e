#!/usr/bin/env bash
# Multi-process training through torchrun: ./distributed_train.sh NUM_PROC [--max-restarts N] --config ... [flags]
# train.py reads RANK/LOCAL_RANK/WORLD_SIZE (NCCL on GPU, gloo on CPU); only rank 0 writes files.
# With --max-restarts, torchrun restarts every worker after a crash; add --resume auto so they pick up the
# newest checkpoint in the run dir by themselves.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 NUM_PROC [--max-restarts N] train.py-args..." >&2
  exit 2
fi
NUM_PROC=$1
shift
TORCHRUN_ARGS=()
if [ "${1:-}" = "--max-restarts" ]; then
  TORCHRUN_ARGS+=(--max-restarts="$2")
  shift 2
fi
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node="$NUM_PROC" "${TORCHRUN_ARGS[@]}" train.py "$@"
