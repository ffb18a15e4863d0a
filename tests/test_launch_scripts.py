"""Launch scripts: shellcheck-clean, the TPU plan runs nothing in --dry-run and hands train.py its arguments
unchanged, the local launcher fails, stops and signals as a unit, the SLURM script wires ranks from srun.

Every external program (gcloud, srun, scontrol, the training interpreter) is a fake on PATH that records
what it was given, so these tests take seconds and need no cluster.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
TRAIN_ARGS = ["--config", "configs/llama_7b.py", "--workdir", "gs://bucket/run"]


def _fake(bin_dir: Path, name: str, body: str) -> Path:
  """An executable bash script `name` in bin_dir."""
  bin_dir.mkdir(parents=True, exist_ok=True)
  path = bin_dir / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)
  return path


def _env(bin_dir: Path, **extra: str) -> dict:
  return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra}


def _gone(pid: int, timeout: float = 3.0) -> bool:
  deadline = time.time() + timeout
  while time.time() < deadline:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    time.sleep(0.05)
  return False


# --- shellcheck -----------------------------------------------------------------------------------------


@pytest.mark.fast
def test_every_script_passes_shellcheck():
  exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
  if exe is None:
    pytest.fail("shellcheck not found: install the dev requirements (pip install -r requirements-dev.txt)")
  scripts = sorted(p for p in SCRIPTS.iterdir() if p.suffix in (".sh", ".sbatch"))
  assert {"launch_local.sh", "launch_tpu.sh", "launch_slurm.sbatch"} <= {p.name for p in scripts}
  proc = subprocess.run([exe, "--shell=bash", *map(str, scripts)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.fast
@pytest.mark.parametrize("script", ["launch_local.sh", "launch_tpu.sh", "launch_slurm.sbatch"])
def test_help(script):
  proc = subprocess.run(["bash", str(SCRIPTS / script), "-h"], capture_output=True, text=True)
  assert proc.returncode == 0 and proc.stdout.startswith("Usage:"), proc.stderr


# --- launch_tpu.sh --------------------------------------------------------------------------------------


@pytest.fixture
def no_cloud(tmp_path):
  """PATH where gcloud, git, tar, curl and ssh only leave a mark and fail; returns (env, mark file)."""
  bin_dir, mark = tmp_path / "bin", tmp_path / "ran"
  for name in ("gcloud", "git", "tar", "curl", "ssh", "scp"):
    _fake(bin_dir, name, f'echo "{name} $*" >> {mark}\nexit 1\n')
  return _env(bin_dir), mark


def _dry_run(env, *args) -> list[str]:
  proc = subprocess.run(
    [str(SCRIPTS / "launch_tpu.sh"), "--dry-run", *args], env=env, capture_output=True, text=True, cwd=REPO
  )
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


@pytest.mark.fast
def test_tpu_dry_run_prints_the_plan_and_runs_nothing(no_cloud):
  env, mark = no_cloud
  lines = _dry_run(env, "--tpu", "my-tpu", "--zone", "us-central2-b", "--", *TRAIN_ARGS)
  assert not mark.exists(), f"--dry-run ran: {mark.read_text()}"
  copy = [line for line in lines if line.startswith("gcloud compute tpus tpu-vm scp ")]
  start = [line for line in lines if line.startswith("gcloud compute tpus tpu-vm ssh my-tpu ")]
  assert len(copy) == 1 and "--worker=all" in copy[0] and "--zone=us-central2-b" in copy[0]
  assert len(start) == 1 and "--worker=all" in start[0]
  assert "python3 train.py --config configs/llama_7b.py --workdir gs://bucket/run" in start[0]
  assert "requirements.txt" in start[0]  # setup is part of a default launch


def test_tpu_workers_get_train_args_unchanged(no_cloud, tmp_path):
  """Runs the printed ssh line against a fake gcloud that runs --command in a fake worker's home."""
  env, _ = no_cloud
  tricky = ["--config", "configs/tiny.py", "--config.data.files=gs://b/it's here/*.txt", "--workdir=$HOME x", ""]
  lines = _dry_run(env, "--tpu", "t", "--zone", "z", "--no-setup", "--", *tricky)
  (ssh_line,) = [line for line in lines if line.startswith("gcloud compute tpus tpu-vm ssh ")]
  assert "requirements.txt" not in ssh_line  # --no-setup

  home, bin_dir = tmp_path / "home", tmp_path / "worker_bin"
  home.mkdir()
  record = tmp_path / "argv"
  _fake(bin_dir, "python3", f'printf "%s\\0" "$@" > {record}\n')
  activate = tmp_path / "activate"
  activate.write_text(f'PATH="{bin_dir}:$PATH"\n')
  with tarfile.open(home / "kiln.tgz", "w:gz") as tar:  # what the scp step copies: the tree with a venv
    tar.add(activate, ".venv/bin/activate")
  gcloud_bin = tmp_path / "gcloud_bin"
  _fake(
    gcloud_bin, "gcloud", 'for a; do [[ $a == --command=* ]] && cd "$HOME" && exec bash -c "${a#--command=}"; done\n'
  )
  proc = subprocess.run(["bash", "-c", ssh_line], env=_env(gcloud_bin, HOME=str(home)), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert record.read_text().split("\0")[:-1] == ["train.py", *tricky]


def test_tpu_multislice_names_slices_and_sets_megascale(no_cloud):
  env, mark = no_cloud
  lines = _dry_run(
    env, "--tpu", "pod", "--zone", "z", "--num_slices", "2", "--", *TRAIN_ARGS, "--config.mesh.dcn_data=2"
  )
  assert not mark.exists()
  describe = [line for line in lines if " describe " in line]
  assert len(describe) == 1 and "pod-0" in describe[0]
  for s in (0, 1):
    (ssh,) = [line for line in lines if line.startswith(f"gcloud compute tpus tpu-vm ssh pod-{s} ")]
    assert ssh.endswith(" &")  # slices start side by side
    assert f"MEGASCALE_SLICE_ID={s} " in ssh and "MEGASCALE_NUM_SLICES=2 " in ssh
    assert "MEGASCALE_COORDINATOR_ADDRESS=<ip-of-pod-0-worker-0>:8080" in ssh
  assert lines[-1] == "wait"


@pytest.mark.parametrize(
  "args, missing",
  [(["--zone", "z", "--", "--config", "c"], "--tpu"), (["--tpu", "t", "--", "--config", "c"], "--zone")],
)
def test_tpu_missing_option_is_one_line_error(no_cloud, args, missing):
  env, mark = no_cloud
  proc = subprocess.run([str(SCRIPTS / "launch_tpu.sh"), *args], env=env, capture_output=True, text=True)
  assert proc.returncode != 0 and not mark.exists()
  assert len(proc.stderr.strip().splitlines()) == 1 and f"missing {missing}" in proc.stderr


# --- launch_local.sh ------------------------------------------------------------------------------------


def test_local_failing_child_fails_the_launcher(tmp_path):
  logs = tmp_path / "logs"
  env = {**os.environ, "KILN_PYTHON": sys.executable}
  proc = subprocess.run(
    [str(SCRIPTS / "launch_local.sh"), "--num_processes", "2", "--devices_per_process", "2", "--log_dir", str(logs)]
    + ["--quiet", "--", "--config", "configs/nope.py"],
    env=env,
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=60,
  )
  assert proc.returncode != 0
  for i in (0, 1):
    assert "configs/nope.py" in (logs / f"process_{i}.log").read_text()
  assert "failed" in proc.stderr


def _fake_trainer(tmp_path: Path, body: str) -> Path:
  """A stand-in for the training interpreter: logs its argv and environment, then runs body."""
  return _fake(
    tmp_path / "bin",
    "python",
    f"""[[ $1 == -c ]] && exec {shlex.quote(sys.executable)} "$@"  # the launcher's free-port lookup
for a; do [[ $a == --process_id=* ]] && id=${{a#*=}}; done
echo "argv: $*"
echo "XLA_FLAGS=$XLA_FLAGS JAX_PLATFORMS=$JAX_PLATFORMS"
echo $$ > {tmp_path}/pid_$id
echo started
{body}
""",
  )


def test_local_one_failure_stops_the_others(tmp_path):
  """Process 1 fails at once; process 0 ignores SIGTERM, so it takes the SIGKILL after the grace period."""
  python = _fake_trainer(tmp_path, "[[ $id == 1 ]] && exit 3\ntrap '' TERM\nsleep 30 & wait $!\n")
  start = time.time()
  proc = subprocess.run(
    [str(SCRIPTS / "launch_local.sh"), "--num_processes=2", "--log_dir", str(tmp_path / "logs"), "--quiet"]
    + ["--", "--config", "configs/tiny.py"],
    env={**os.environ, "KILN_PYTHON": str(python), "KILN_KILL_GRACE_S": "1"},
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert proc.returncode == 3, proc.stderr
  assert time.time() - start < 10
  assert "process 1 exited with status 3" in proc.stderr
  assert _gone(int((tmp_path / "pid_0").read_text())), "process 0 was left running"


def test_local_forwards_sigterm_and_wires_the_cluster(tmp_path):
  python = _fake_trainer(tmp_path, "trap 'echo stopped by TERM; exit 0' TERM\nsleep 30 & wait $!\n")
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    [str(SCRIPTS / "launch_local.sh"), "--num-processes", "2", "--devices-per-process", "4", "--quiet", "--"]
    + ["--config", "configs/tiny.py", "--workdir", str(workdir)],
    env={**os.environ, "KILN_PYTHON": str(python), "XLA_FLAGS": "--xla_dump_to=/nowhere"},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  logs = [workdir / "logs" / f"process_{i}.log" for i in (0, 1)]  # the default: <workdir>/logs
  deadline = time.time() + 20
  while not all(log.exists() and "started" in log.read_text() for log in logs):
    assert time.time() < deadline and proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=20)
  assert proc.returncode == 0, stderr
  texts = [log.read_text() for log in logs]
  ports = set()
  for i, text in enumerate(texts):
    assert "stopped by TERM" in text
    (argv_line,) = [line for line in text.splitlines() if line.startswith("argv: ")]
    argv = shlex.split(argv_line.removeprefix("argv: "))
    assert argv[1:5] == ["--config", "configs/tiny.py", "--workdir", str(workdir)]
    assert f"--process_id={i}" in argv and "--num_processes=2" in argv
    (address,) = [a for a in argv if a.startswith("--coordinator_address=127.0.0.1:")]
    ports.add(address)
    assert "XLA_FLAGS=--xla_dump_to=/nowhere --xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu" in text
  assert len(ports) == 1


def test_local_missing_num_processes_is_one_line_error():
  proc = subprocess.run([str(SCRIPTS / "launch_local.sh"), "--", "--config", "c"], capture_output=True, text=True)
  assert proc.returncode != 0
  assert len(proc.stderr.strip().splitlines()) == 1 and "missing --num_processes" in proc.stderr


# --- launch_slurm.sbatch --------------------------------------------------------------------------------


@pytest.fixture
def fake_slurm(tmp_path):
  """Fake scontrol and srun (srun runs its command once per task, as SLURM would, with the task's ranks)."""
  bin_dir = tmp_path / "bin"
  _fake(
    bin_dir,
    "scontrol",
    f'echo "$*" >> {tmp_path}/scontrol\n[[ "$1 $2" == "show hostnames" ]] && printf "gpu07\\ngpu08\\n"\n',
  )
  _fake(
    bin_dir,
    "srun",
    """echo "srun $*"
ntasks=1 per_node=1
while [[ $1 == -* ]]; do
  case $1 in --ntasks=*) ntasks=${1#*=} ;; --ntasks-per-node=*) per_node=${1#*=} ;; esac
  shift
done
for ((p = 0; p < ntasks; p++)); do SLURM_NTASKS=$ntasks SLURM_PROCID=$p SLURM_LOCALID=$((p % per_node)) "$@"; done
""",
  )
  python = _fake(bin_dir, "python", 'printf "%s\\0" "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}" "$@"; echo\n')
  env = _env(
    bin_dir,
    KILN_PYTHON=str(python),
    SLURM_JOB_ID="4242",
    SLURM_JOB_NODELIST="gpu[07-08]",
    SLURM_JOB_NUM_NODES="2",
    SLURM_NTASKS="2",
    SLURM_GPUS_ON_NODE="8",
  )
  env.pop("CUDA_VISIBLE_DEVICES", None)
  return env, tmp_path / "scontrol"


def _sbatch(env, *train_args) -> tuple[list[str], list[list[str]]]:
  """Runs the batch script as SLURM would (in the submit directory); returns (srun lines, argv per process)."""
  proc = subprocess.run(
    ["bash", str(SCRIPTS / "launch_slurm.sbatch"), *train_args], env=env, capture_output=True, text=True, cwd=REPO
  )
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.split("\n")
  srun = [line for line in lines if line.startswith("srun ")]
  processes = [line.split("\0")[:-1] for line in lines if "\0" in line]
  return srun, processes


def test_slurm_one_process_per_node(fake_slurm):
  env, scontrol = fake_slurm
  args = ["--config", "configs/llama_7b.py", "--config.data.files=/data/a b/*.txt"]
  srun, processes = _sbatch({**env, "KILN_PORT": "29500"}, *args)
  assert scontrol.read_text().split() == ["show", "hostnames", "gpu[07-08]"]
  assert len(srun) == 1 and "--ntasks=2" in srun[0] and "--kill-on-bad-exit=1" in srun[0]
  assert len(processes) == 2
  for rank, argv in enumerate(processes):
    assert argv == [
      "CUDA_VISIBLE_DEVICES=unset",  # each process sees all of its node's GPUs
      "train.py",
      *args,
      "--coordinator_address=gpu07:29500",
      "--num_processes=2",
      f"--process_id={rank}",
    ]


def test_slurm_one_process_per_gpu(fake_slurm):
  env, _ = fake_slurm
  _, processes = _sbatch({**env, "KILN_PROCESS_PER": "gpu"}, "--config", "configs/llama_7b.py")
  assert len(processes) == 16
  coordinators = {argv[-3] for argv in processes}
  assert len(coordinators) == 1 and coordinators.pop().startswith("--coordinator_address=gpu07:")
  assert [argv[-1] for argv in processes] == [f"--process_id={r}" for r in range(16)]
  assert all(argv[-2] == "--num_processes=16" for argv in processes)
  assert [argv[0] for argv in processes] == [f"CUDA_VISIBLE_DEVICES={r % 8}" for r in range(16)]


def test_slurm_outside_a_job_is_one_line_error(fake_slurm):
  env, _ = fake_slurm
  env.pop("SLURM_JOB_ID")
  proc = subprocess.run(
    ["bash", str(SCRIPTS / "launch_slurm.sbatch"), "--config", "c"], env=env, capture_output=True, text=True, cwd=REPO
  )
  assert proc.returncode != 0
  assert len(proc.stderr.strip().splitlines()) == 1 and "not inside a SLURM job" in proc.stderr


def test_slurm_and_tpu_launches_set_the_collective_overlap_flags(fake_slurm, no_cloud, tmp_path):
  env, _ = fake_slurm
  flags_seen = tmp_path / "xla_flags"
  python = _fake(tmp_path, "python_flags", f'echo "$XLA_FLAGS" >> {flags_seen}\n')
  _sbatch({**env, "KILN_PYTHON": str(python), "XLA_FLAGS": "--xla_dump_to=/tmp/d"}, "--config", "configs/tiny.py")
  for line in flags_seen.read_text().splitlines():  # the user's flags kept, the overlap flags added
    assert line.startswith("--xla_dump_to=/tmp/d --xla_gpu_enable_latency_hiding_scheduler=true")
  _sbatch({**env, "KILN_PYTHON": str(python), "KILN_XLA_OVERLAP": "0", "XLA_FLAGS": ""}, "--config", "configs/tiny.py")
  assert flags_seen.read_text().splitlines()[-1] == ""

  tpu_env, _ = no_cloud
  ssh = [line for line in _dry_run(tpu_env, "--tpu", "t", "--zone", "z", "--", *TRAIN_ARGS) if " ssh " in line]
  assert "LIBTPU_INIT_ARGS=" in ssh[0] and "--xla_tpu_enable_async_collective_fusion=true" in ssh[0]
