#!/usr/bin/env bash
# Launch train_gpt2.py on every GPU of this machine, or of several machines; extra arguments go to the script.
#   ./run.sh                                          the 8xH100 record run (fetches the data first if missing)
#   NPROC_PER_NODE=1 ./run.sh                         one GPU: same math, 8 micro-steps per step
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./run.sh    on each node, with NODE_RANK 0 and 1
#   LOCAL_ADDR=10.0.0.2 ...                            this node's address, where its hostname does not resolve
# Flags take both forms, --input_bin PATH and --input_bin=PATH. Relative paths in --input_bin, --input_val_bin,
# --records_dir, --checkpoint_dir and --resume mean what they mean in the folder run.sh was started from.
# A signal (INT, TERM, HUP, QUIT, USR1) goes on to the trainer, which checkpoints and stops; run.sh then exits
# 128 + its number. torchrun's own messages go to a file, named when torchrun fails.
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")"
if [ -z "${PYTHON:-}" ]; then  # the set-up's venv (README), else the python3 on PATH
  PYTHON=python3
  if [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; fi
fi
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

# The trainer prints this launcher, with its variables (NAME=value, one a line), in the command that continues
export TRAIN_GPT2_LAUNCHER=$PWD/run.sh
if [ "${NNODES:-1}" = 1 ]; then
  # Loopback for the workers' store: one machine needs no hostname lookup, which fails in some containers.
  torchrun=(--standalone --local-addr=127.0.0.1)
else
  : "${MASTER_ADDR:?run.sh: set MASTER_ADDR to the address of the node with NODE_RANK=0}"
  : "${NODE_RANK:?run.sh: set NODE_RANK (0 to NNODES-1) on each node}"
  IS_HOST=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)  # node 0 hosts the rendezvous store, never a race between nodes
  torchrun=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}")
  torchrun+=(--rdzv-conf="is_host=$IS_HOST" ${LOCAL_ADDR:+--local-addr="$LOCAL_ADDR"} --rdzv-id="${RUN_ID:-speedrun}")
  TRAIN_GPT2_LAUNCHER=$(printf '%s\n' "NNODES=$NNODES" "NODE_RANK=$NODE_RANK" "MASTER_ADDR=$MASTER_ADDR" \
    "MASTER_PORT=${MASTER_PORT:-29500}" ${LOCAL_ADDR:+"LOCAL_ADDR=$LOCAL_ADDR"} ${RUN_ID:+"RUN_ID=$RUN_ID"} \
    "$TRAIN_GPT2_LAUNCHER")
fi

# torchrun's own stderr goes to $log: its log lines (W0312 14:03:11.123000 <pid> <file>:<line>] ...) and the
# traceback it ends with after a signal or a failed worker, with all that follows; the trainer's, to the console.
log=$(mktemp "${TMPDIR:-/tmp}/run_sh_torchrun.XXXXXX")
torchrun_to_log() {
  trap '' INT TERM HUP QUIT USR1  # read to the end: the trainer's last lines come after the signal
  local line held=() ended=0
  while IFS= read -r line || [ -n "$line" ]; do
    if [ "$ended" = 1 ] || [[ $line =~ ^[IWEF][0-9]{4}\ [0-9:.]+\ +[0-9]+\ [^\ ]+:[0-9]+\]\  ]]; then
      printf '%s\n' "$line" >>"$log"
    elif [ ${#held[@]} -gt 0 ] || [ "$line" = "Traceback (most recent call last):" ]; then
      held+=("$line")
      if [[ $line != " "* && $line != Traceback* ]]; then  # the exception's line ends a traceback
        if [[ $line == torch.distributed.elastic.* ]]; then
          ended=1
          printf '%s\n' "${held[@]}" >>"$log"
        else
          printf '%s\n' "${held[@]}" >&2
        fi
        held=()
      fi
    else
      printf '%s\n' "$line" >&2
    fi
  done
  if [ ${#held[@]} -gt 0 ]; then printf '%s\n' "${held[@]}" >&2; fi
}

signal=0
for name in INT TERM HUP QUIT USR1; do
  trap "signal=\$(kill -l $name); kill -s $name \${torchrun_pid:-} 2>/dev/null || true" "$name"
done
exec 4> >(torchrun_to_log)
filter_pid=$!
set -m  # torchrun in its own process group: a Ctrl-C reaches it once, from run.sh, never twice
"$PYTHON" -m torch.distributed.run "${torchrun[@]}" --nproc_per_node="$NPROC_PER_NODE" train_gpt2.py \
  ${args[@]+"${args[@]}"} 2>&4 &
torchrun_pid=$!
set +m
exec 4>&-
# wait returns early for each signal forwarded; the status is torchrun's once it has exited
while wait "$torchrun_pid"; status=$?; kill -0 "$torchrun_pid" 2>/dev/null; do :; done
# the filter ends with torchrun's output; a signal meanwhile returns early: wait again (set -e would exit)
while ! wait "$filter_pid"; do kill -0 "$filter_pid" 2>/dev/null || break; done
if [ "$signal" != 0 ]; then
  rm -f "$log"
  exit $((128 + signal))  # torchrun exits 1 after any signal; the trainer stopped on this one
fi
if [ "$status" != 0 ] && [ -s "$log" ]; then
  echo "run.sh: torchrun exited with status $status; its own messages are in $log" >&2
else
  rm -f "$log"
fi
exit "$status"
