#!/usr/bin/env bash
# Runs train.py as several JAX processes on this machine, each with its own emulated CPU devices: a
# multi-host run in miniature. One process failing stops them all; a signal reaches every process.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/launch_local.sh --num_processes N [--devices_per_process M] [--port PORT]
                               [--log_dir DIR] [--quiet] -- TRAIN_ARGS...

Starts N copies of `train.py TRAIN_ARGS` on this machine, joined into one JAX cluster (process i gets
--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i), each with M emulated CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=M), so the mesh spans N*M devices.

Options:
  --num_processes N        processes to start (required)
  --devices_per_process M  emulated CPU devices per process (default 1)
  --port PORT              coordinator port (default: a free one)
  --log_dir DIR            where process_<i>.log go, appended to (default <workdir>/logs when
                           TRAIN_ARGS has --workdir, else runs/launch_logs)
  --quiet                  do not echo process 0's log to the terminal
  -h, --help               this text
Options may also be spelled with '-' for '_' and as --opt=value.

Exit status: 0 when every process exits 0, else the status of the first process that failed; the
others are then sent SIGTERM, and SIGKILL after KILN_KILL_GRACE_S seconds (default 10).
SIGINT (Ctrl-C) or SIGTERM to the launcher is passed to every process as SIGTERM: train.py saves a
checkpoint and exits 0. A second Ctrl-C kills them at once.

Environment: KILN_PYTHON (interpreter, default python3), XLA_FLAGS (extended, not replaced),
JAX_PLATFORMS (default cpu), KILN_KILL_GRACE_S.

Example:
  scripts/launch_local.sh --num_processes 2 --devices_per_process 4 -- \
    --config configs/tiny.py --workdir runs/tiny_2proc --config.mesh.fsdp=8 --config.mesh.data=1
EOF
}

die() {
  echo "launch_local.sh: error: $*" >&2
  exit 2
}

num_processes=""
devices_per_process=1
port=""
log_dir=""
quiet=0
while (($#)); do
  arg=$1
  shift
  case $arg in
    -h | --help) usage; exit 0 ;;
    --) break ;;
    --*) ;;
    *) die "unexpected argument '$arg' (train.py arguments go after --; see -h)" ;;
  esac
  key=${arg#--}
  key=${key%%=*}
  key=${key//-/_}
  if [[ $key == quiet ]]; then
    quiet=1
    continue
  fi
  if [[ $arg == *=* ]]; then
    value=${arg#*=}
  else
    (($#)) || die "$arg needs a value"
    value=$1
    shift
  fi
  case $key in
    num_processes) num_processes=$value ;;
    devices_per_process) devices_per_process=$value ;;
    port) port=$value ;;
    log_dir) log_dir=$value ;;
    *) die "unknown option '$arg' (train.py arguments go after --; see -h)" ;;
  esac
done
train_args=("$@")

[[ -n $num_processes ]] || die "missing --num_processes N (how many processes to start)"
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || die "--num_processes must be a positive integer, got '$num_processes'"
[[ $devices_per_process =~ ^[1-9][0-9]*$ ]] ||
  die "--devices_per_process must be a positive integer, got '$devices_per_process'"
[[ -z $port || $port =~ ^[1-9][0-9]*$ ]] || die "--port must be a port number, got '$port'"
((${#train_args[@]})) || die "no train.py arguments; put them after --, e.g. -- --config configs/tiny.py"
grace_s=${KILN_KILL_GRACE_S:-10}
[[ $grace_s =~ ^[0-9]+$ ]] || die "KILN_KILL_GRACE_S must be a whole number of seconds, got '$grace_s'"

python=${KILN_PYTHON:-python3}
train_py="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/train.py"

if [[ -z $log_dir ]]; then
  workdir=""
  for ((i = 0; i < ${#train_args[@]}; i++)); do
    case ${train_args[i]} in
      --workdir=*) workdir=${train_args[i]#--workdir=} ;;
      --workdir) workdir=${train_args[i + 1]:-} ;;
    esac
  done
  if [[ -n $workdir && $workdir != *://* ]]; then log_dir=$workdir/logs; else log_dir=runs/launch_logs; fi
fi
mkdir -p "$log_dir"

if [[ -z $port ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
fi

pids=()      # one per process; emptied once it has been waited for
tail_pid=""  # echoes process 0's log

signal_all() {
  local pid
  for pid in "${pids[@]}"; do
    # Each process leads its own process group (set -m below), so this reaches its children too.
    [[ -z $pid ]] || kill -s "$1" -- "-$pid" 2>/dev/null || true
  done
}

# shellcheck disable=SC2329  # called by the EXIT trap
cleanup() {
  signal_all KILL  # only processes not yet waited for: never leave orphans behind
  if [[ -n $tail_pid ]]; then
    sleep 0.2 || true  # let tail print the last lines
    kill "$tail_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

interrupted=0
# shellcheck disable=SC2329  # called by the INT/TERM trap
on_signal() {
  if ((interrupted)); then
    echo "launch_local.sh: second signal: killing all processes" >&2
    signal_all KILL
  else
    interrupted=1
    echo "launch_local.sh: passing SIGTERM to all processes (they save and exit); signal again to kill" >&2
    signal_all TERM
  fi
}
trap on_signal INT TERM

echo "launch_local.sh: $num_processes processes x $devices_per_process CPU devices," \
  "coordinator 127.0.0.1:$port, logs in $log_dir/process_<i>.log" >&2
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices_per_process"
set -m  # every process gets its own process group: Ctrl-C reaches only this script, which passes it on
for ((i = 0; i < num_processes; i++)); do
  echo "==== $(date '+%Y-%m-%d %H:%M:%S') launch_local.sh: process $i of $num_processes" >>"$log_dir/process_$i.log"
done
if ((!quiet)); then
  tail -n 0 -f "$log_dir/process_0.log" &
  tail_pid=$!
fi
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS=$xla_flags JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
    "$python" "$train_py" "${train_args[@]}" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" --process_id="$i" \
    </dev/null >>"$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
set +m

status=0
failed=""
deadline=""  # when processes that were asked to stop after a failure get SIGKILL
while true; do
  running=0
  for i in "${!pids[@]}"; do
    pid=${pids[i]}
    [[ -n $pid ]] || continue
    if kill -0 "$pid" 2>/dev/null; then
      running=1
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[i]=""
    if ((rc != 0)) && [[ -z $failed ]]; then
      status=$rc
      failed=$i
      echo "launch_local.sh: process $i exited with status $rc; stopping the others" >&2
      signal_all TERM
      deadline=$((SECONDS + grace_s))
    fi
  done
  ((running)) || break
  if [[ -n $deadline ]] && ((SECONDS >= deadline)); then
    echo "launch_local.sh: processes still running ${grace_s}s after SIGTERM: sending SIGKILL" >&2
    signal_all KILL
    deadline=""
  fi
  sleep 0.2 || true  # a Ctrl-C kills the sleep too; the trap has run, carry on
done

if [[ -n $failed ]]; then
  log=$log_dir/process_$failed.log
  {
    echo "launch_local.sh: process $failed failed (status $status); the end of $log:"
    tail -n 20 "$log" | sed 's/^/  | /'
  } >&2
fi
exit "$status"
