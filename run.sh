#!/usr/bin/env bash
# Launch train_gpt2.py on every GPU of this machine, or of several machines; extra arguments go to the script.
#   ./run.sh                                          the 8xH100 record run (fetches the data first if missing)
#   NPROC_PER_NODE=1 ./run.sh                         one GPU: same math, 8 micro-steps per step
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./run.sh    on each node, with NODE_RANK 0 and 1
#   LOCAL_ADDR=10.0.0.2 ...                            this node's address, where its hostname does not resolve
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [ -z "${NPROC_PER_NODE:-}" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  NPROC_PER_NODE=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)  # only the GPUs this shell may use
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if [ "$NPROC_PER_NODE" -lt 1 ]; then
    echo "run.sh: nvidia-smi finds no GPU; set NPROC_PER_NODE (NPROC_PER_NODE=1 ./run.sh --device=cpu runs on the CPU)" >&2
    exit 1
  fi
fi

case " $* " in
  *" --input_bin="*) ;;  # the caller brings their own data
  *) "$PYTHON" data/cached_fineweb10B.py ;;  # fetches only missing or broken shards
esac

if [ "${NNODES:-1}" = 1 ]; then
  # Loopback for the workers' store: one machine needs no hostname lookup, which fails in some containers.
  exec "$PYTHON" -m torch.distributed.run --standalone --local-addr=127.0.0.1 --nproc_per_node="$NPROC_PER_NODE" \
    train_gpt2.py "$@"
fi
: "${MASTER_ADDR:?run.sh: set MASTER_ADDR to the address of the node with NODE_RANK=0}"
: "${NODE_RANK:?run.sh: set NODE_RANK (0 to NNODES-1) on each node}"
IS_HOST=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)  # node 0 hosts the rendezvous store, never a race between nodes
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-conf="is_host=$IS_HOST" \
  ${LOCAL_ADDR:+--local-addr="$LOCAL_ADDR"} --rdzv-id="${RUN_ID:-speedrun}" train_gpt2.py "$@"
