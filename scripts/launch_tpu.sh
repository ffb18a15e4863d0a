#!/usr/bin/env bash
# Runs train.py on every worker of a Cloud TPU VM slice (or of several slices), from your own machine:
# ships this working tree, installs the requirements, starts the same command on all workers.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/launch_tpu.sh --tpu NAME --zone ZONE [--project PROJECT] [--num_slices K]
                             [--setup-only | --no-setup] [--detach] [--dry-run] -- TRAIN_ARGS...

Steps, per slice (all workers at once, --worker=all):
  1. pack this working tree (tracked and untracked files that git does not ignore) into a tarball,
     copy it to every worker (gcloud compute tpus tpu-vm scp) and unpack it into ~/kiln;
  2. setup: a Python 3.11 virtualenv in ~/kiln/.venv (made with uv) with requirements.txt and
     jax[tpu] at the version requirements.txt pins;
  3. run `python3 train.py TRAIN_ARGS` in ~/kiln on every worker (gcloud compute tpus tpu-vm ssh).
JAX finds the slice's other workers itself: no coordinator flags are needed.

Options:
  --tpu NAME        the TPU VM (required); with --num_slices K, the slices NAME-0 ... NAME-<K-1>
  --zone ZONE       its zone, e.g. us-east5-a (required)
  --project ID      its project (default: gcloud's configured project)
  --num_slices K    multi-slice over K slices (default 1): each worker gets MEGASCALE_NUM_SLICES,
                    MEGASCALE_SLICE_ID and MEGASCALE_COORDINATOR_ADDRESS (worker 0 of NAME-0, port
                    8080). Split the mesh across slices in the config, e.g. --config.mesh.dcn_data=K.
                    A queued resource made with --node-count K --node-prefix NAME has these names.
  --setup-only      steps 1 and 2, no training
  --no-setup        steps 1 and 3 (the virtualenv from an earlier setup is reused)
  --detach          start training under nohup (log in ~/kiln/train.log on each worker) and return
  --dry-run         print every command, one per line, instead of running it; with K > 1 slices the
                    coordinator's address shows as <ip-of-NAME-0-worker-0> (looked up when run)
  -h, --help        this text
Options may also be spelled with '_' for '-' and as --opt=value.

The --workdir must be one place all workers share (gs://..., or a mount at the same path on each):
each worker's disk is its own. Without --detach the run ends with this ssh session (use --detach or
tmux for long runs). To stop a detached run (train.py saves first):
  gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command='pkill -TERM -f train.py'

Example (v5p-64: 32 chips on 8 workers):
  scripts/launch_tpu.sh --tpu my-v5p-64 --zone us-east5-a -- \
    --config configs/llama_7b.py --workdir gs://my-bucket/llama_7b
EOF
}

die() {
  echo "launch_tpu.sh: error: $*" >&2
  exit 2
}

tpu=""
zone=""
project=""
num_slices=1
setup=1
train=1
detach=0
dry_run=0
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
  key=${key//_/-}
  case $key in
    setup-only) train=0; continue ;;
    no-setup) setup=0; continue ;;
    detach) detach=1; continue ;;
    dry-run) dry_run=1; continue ;;
  esac
  if [[ $arg == *=* ]]; then
    value=${arg#*=}
  else
    (($#)) || die "$arg needs a value"
    value=$1
    shift
  fi
  case $key in
    tpu) tpu=$value ;;
    zone) zone=$value ;;
    project) project=$value ;;
    num-slices) num_slices=$value ;;
    *) die "unknown option '$arg' (train.py arguments go after --; see -h)" ;;
  esac
done
train_args=("$@")

[[ -n $tpu ]] || die "missing --tpu NAME (the TPU VM to run on)"
[[ -n $zone ]] || die "missing --zone ZONE (the TPU VM's zone, e.g. us-east5-a)"
[[ $num_slices =~ ^[1-9][0-9]*$ ]] || die "--num_slices must be a positive integer, got '$num_slices'"
((setup || train)) || die "--setup-only and --no-setup together leave nothing to do"
if ((train)) && ((${#train_args[@]} == 0)); then
  die "no train.py arguments; put them after --, e.g. -- --config configs/llama_7b.py --workdir gs://BUCKET/RUN"
fi
if ((train && num_slices > 1)) && [[ " ${train_args[*]} " != *" --config.mesh.dcn_"* ]]; then
  echo "launch_tpu.sh: warning: $num_slices slices but no --config.mesh.dcn_<axis>=...;" \
    "the mesh must span the slices, e.g. --config.mesh.dcn_data=$num_slices" >&2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tarball="${TMPDIR:-/tmp}/kiln-$tpu.tgz"
jax_version=$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$repo/requirements.txt")
megascale_port=8080
# Every worker runs with these libtpu flags, which let collectives (FSDP all-gathers, gradient reductions,
# pipeline permutes) run asynchronously and overlap the compute around them. A LIBTPU_INIT_ARGS set where this
# script runs replaces them.
libtpu_args=${LIBTPU_INIT_ARGS:-"--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true --xla_enable_async_collective_permute=true"}

# Prints words as one shell line, quoting only the words that need it (so `python3 train.py --config X`
# stays readable in --dry-run output); `--name=value` keeps `--name=` outside the quotes.
shell_line() {
  local word prefix out=()
  for word; do
    prefix=""
    if [[ $word =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      prefix=${BASH_REMATCH[1]}
      word=${BASH_REMATCH[2]}
    fi
    if [[ ! $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      word="'${word//\'/\'\\\'\'}'"
    fi
    out+=("$prefix$word")
  done
  printf '%s\n' "${out[*]}"
}

# Runs a command, or with --dry-run prints it.
run() {
  if ((dry_run)); then shell_line "$@"; else "$@"; fi
}

gcloud_flags=(--zone="$zone")
[[ -z $project ]] || gcloud_flags+=(--project="$project")

slice_names=()
if ((num_slices == 1)); then
  slice_names=("$tpu")
else
  for ((s = 0; s < num_slices; s++)); do slice_names+=("$tpu-$s"); done
fi

# 1. Pack the working tree.
list_files=(git -C "$repo" ls-files -z --cached --others --exclude-standard)
pack=(tar -czf "$tarball" -C "$repo" --null -T -)
if ((dry_run)); then
  echo "$(shell_line "${list_files[@]}") | $(shell_line "${pack[@]}")"
else
  echo "launch_tpu.sh: packing $repo into $tarball" >&2
  "${list_files[@]}" | "${pack[@]}"
fi

coordinator=""
if ((train && num_slices > 1)); then
  describe=(gcloud compute tpus tpu-vm describe "${slice_names[0]}" "${gcloud_flags[@]}"
    "--format=value(networkEndpoints[0].ipAddress)")
  if ((dry_run)); then
    shell_line "${describe[@]}"
    coordinator="<ip-of-${slice_names[0]}-worker-0>"
  else
    coordinator=$("${describe[@]}")
    [[ -n $coordinator ]] || die "could not find the internal IP of ${slice_names[0]}'s worker 0"
  fi
fi

# The command every worker runs, from its home directory: one line of steps joined by &&.
remote_command() {
  local slice_id=$1 cmd steps=("mkdir -p kiln" "tar -xzf kiln.tgz -C kiln" "cd kiln")
  if ((setup)); then
    steps+=(
      "export PATH=\$HOME/.local/bin:\$PATH"
      "{ command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
      "{ [ -x .venv/bin/python3 ] || uv venv --python 3.11 .venv; }"
      "uv pip install --python .venv/bin/python3 -r requirements.txt $(shell_line "jax[tpu]${jax_version:+==$jax_version}")"
    )
  fi
  if ((train)); then
    local env="LIBTPU_INIT_ARGS='$libtpu_args' "
    if ((num_slices > 1)); then
      env+="MEGASCALE_COORDINATOR_ADDRESS=$coordinator:$megascale_port MEGASCALE_PORT=$megascale_port"
      env+=" MEGASCALE_NUM_SLICES=$num_slices MEGASCALE_SLICE_ID=$slice_id "
    fi
    cmd="python3 train.py $(shell_line "${train_args[@]}")"
    if ((detach)); then cmd="{ ${env}nohup $cmd >train.log 2>&1 </dev/null & }"; else cmd="$env$cmd"; fi
    steps+=(". .venv/bin/activate" "$cmd")
  fi
  local joined
  printf -v joined ' && %s' "${steps[@]}"
  printf '%s\n' "${joined# && }"
}

# 2-3. Copy, set up and train on every slice; the slices run side by side.
pids=()
for s in "${!slice_names[@]}"; do
  name=${slice_names[s]}
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:kiln.tgz" --worker=all "${gcloud_flags[@]}"
  ssh=(gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all --command="$(remote_command "$s")")
  if ((num_slices == 1)); then
    run "${ssh[@]}"
  elif ((dry_run)); then
    echo "$(shell_line "${ssh[@]}") &"
  else
    "${ssh[@]}" &
    pids+=("$!")
  fi
done
if ((num_slices > 1)); then
  if ((dry_run)); then
    echo "wait"
  else
    status=0
    for s in "${!pids[@]}"; do
      wait "${pids[s]}" || { status=$?; echo "launch_tpu.sh: slice ${slice_names[s]} failed (status $status)" >&2; }
    done
    exit "$status"
  fi
fi
