#!/usr/bin/env bash
# Launch train_gpt2.py on every GPU of this machine, or of several machines; extra arguments go to the script.
#   ./run.sh                                          the 8xH100 record run (fetches the data first if missing)
#   NPROC_PER_NODE=1 ./run.sh                         one GPU: same math, 8 micro-steps per step
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./run.sh    on each node, with NODE_RANK 0 and 1
#   LOCAL_ADDR=10.0.0.2 ...                            this node's address, where its hostname does not resolve
# Flags take both forms, --input_bin PATH and --input_bin=PATH. Relative paths in --input_bin, --input_val_bin,
# --records_dir, --checkpoint_dir and --resume mean what they mean in the folder run.sh was started from.
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# torchrun passes on only TERM, INT, HUP and QUIT; SLURM's --signal=USR1@<seconds> warns of the time limit with USR1
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}

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

# A relative path given by the caller, made absolute against the caller's folder: $1 the flag, $2 its value.
absolute() {
  case "$2" in
    /* | "") printf '%s' "$2" ;;
    *)
      case "$1" in
        # globs: the folder is escaped as Python's glob.escape does, so a [ or * in its name is a plain character
        input_bin | input_val_bin) printf '%s/%s' "$(printf '%s' "$CALLER_DIR" | sed 's/[[*?]/[&]/g')" "$2" ;;
        resume) if [ "$2" = latest ]; then printf latest; else printf '%s/%s' "$CALLER_DIR" "$2"; fi ;;
        *) printf '%s/%s' "$CALLER_DIR" "$2" ;;
      esac
      ;;
  esac
}

args=()
own_data=0
while [ $# -gt 0 ]; do
  arg=$1
  shift
  for flag in input_bin input_val_bin records_dir checkpoint_dir resume; do
    if [ "$arg" = "--$flag" ] && [ $# -gt 0 ]; then
      args+=("$arg")
      arg=$(absolute "$flag" "$1")
      shift
    elif [[ "$arg" == "--$flag="* ]]; then
      arg="--$flag=$(absolute "$flag" "${arg#*=}")"
    else
      continue
    fi
    if [ "$flag" = input_bin ]; then own_data=1; fi
    break
  done
  args+=("$arg")
done

if [ "$own_data" = 0 ]; then
  "$PYTHON" data/cached_fineweb10B.py  # fetches only missing or broken shards
fi

if [ "${NNODES:-1}" = 1 ]; then
  # Loopback for the workers' store: one machine needs no hostname lookup, which fails in some containers.
  exec "$PYTHON" -m torch.distributed.run --standalone --local-addr=127.0.0.1 --nproc_per_node="$NPROC_PER_NODE" \
    train_gpt2.py ${args[@]+"${args[@]}"}
fi
: "${MASTER_ADDR:?run.sh: set MASTER_ADDR to the address of the node with NODE_RANK=0}"
: "${NODE_RANK:?run.sh: set NODE_RANK (0 to NNODES-1) on each node}"
IS_HOST=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)  # node 0 hosts the rendezvous store, never a race between nodes
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-conf="is_host=$IS_HOST" \
  ${LOCAL_ADDR:+--local-addr="$LOCAL_ADDR"} --rdzv-id="${RUN_ID:-speedrun}" train_gpt2.py ${args[@]+"${args[@]}"}
