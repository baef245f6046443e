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
# Bad input (a recipe typo, a missing --data-dir) makes every worker exit with code 2 and one "error:" line, but
# torchrun reports any failed worker as exit code 1 under its own summary. The workers write that line to
# SPARSITY_ERROR_FILE (rank 0 also prints it; the others stay quiet); after torchrun this script repeats each
# distinct line at the end and exits with 2, as train.py does.
ERROR_FILE=$(mktemp "${TMPDIR:-/tmp}/sparsity-error.XXXXXX")
trap 'rm -f "$ERROR_FILE"' EXIT
set +e
SPARSITY_ERROR_FILE="$ERROR_FILE" "$PY" -m torch.distributed.run --standalone --nproc-per-node="$NUM_PROC" \
  "${TORCHRUN_ARGS[@]}" train.py "$@" &
child=$!
trap 'kill -INT "$child" 2>/dev/null' INT
trap 'kill -TERM "$child" 2>/dev/null' TERM
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break  # a trapped signal ends wait early: wait again until torchrun is done
done
if [ "$rc" -ne 0 ] && [ -s "$ERROR_FILE" ]; then
  awk '!seen[$0]++ { print "error: " $0 }' "$ERROR_FILE" >&2  # each distinct line once (every rank wrote its own)
  exit 2
fi
exit "$rc"
