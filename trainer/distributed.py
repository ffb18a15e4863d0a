"""Joining a multi-process job: `jax.distributed.initialize`, with a rendezvous that fails in one line.

A coordinator nobody listens at, or processes started with different counts, make JAX's coordination
service abort the process from C++ after its timeout, with a stack trace. So before JAX starts, the processes
meet once over plain TCP on the coordinator's own port: process 0 listens, every other process connects and
says who it is, process 0 checks the ids and counts and answers; only then do all call JAX, whose service
then binds the same port. Every failure is a `DistributedError` naming the address or the counts.
"""

import json
import logging
import os
import socket
import time

import jax

_log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
  """A multi-process job that cannot start, in the user's terms."""


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not port.isdigit():
    raise DistributedError(f"--coordinator_address={address!r} is not HOST:PORT; e.g. 10.0.0.1:12355")
  return host.strip("[]"), int(port)


def _serve(address: str, num_processes: int, deadline: float) -> None:
  host, port = _split_address(address)
  with socket.create_server(("", port), reuse_port=hasattr(socket, "SO_REUSEPORT")) as server:
    peers: dict[int, socket.socket] = {}
    problem = None
    while len(peers) < num_processes - 1 and problem is None:
      server.settimeout(max(deadline - time.time(), 0.01))
      try:
        conn, _ = server.accept()
      except TimeoutError:
        missing = sorted(set(range(1, num_processes)) - set(peers))
        problem = (
          f"only {len(peers) + 1} of {num_processes} processes reached the coordinator at {address} in time "
          f"(missing process ids {missing}); start all of them with the same --num_processes"
        )
        break
      conn.settimeout(10)
      hello = json.loads(conn.makefile().readline() or "{}")
      peers[hello.get("id", -1)] = conn
      if hello.get("n") != num_processes:
        problem = (
          f"process {hello.get('id')} was started with --num_processes={hello.get('n')} but process 0 with "
          f"{num_processes}; give every process the same count"
        )
      elif not 0 < hello.get("id", -1) < num_processes:
        problem = f"process id {hello.get('id')} is outside 1..{num_processes - 1}; ids must be 0..num_processes-1"
    reply = json.dumps({"error": problem} if problem else {"ok": True}) + "\n"
    for conn in peers.values():
      try:
        conn.sendall(reply.encode())
      finally:
        conn.close()
  if problem:
    raise DistributedError(problem)


def _join(address: str, num_processes: int, process_id: int, deadline: float) -> None:
  host, port = _split_address(address)
  conn = None
  while conn is None:
    try:
      conn = socket.create_connection((host, port), timeout=max(min(deadline - time.time(), 5), 0.01))
    except OSError:
      if time.time() >= deadline:
        raise DistributedError(
          f"no coordinator answered at {address} (process {process_id} of {num_processes} waited until the "
          "timeout); start process 0 there, or fix --coordinator_address"
        ) from None
      time.sleep(0.2)
  with conn:
    conn.sendall((json.dumps({"id": process_id, "n": num_processes}) + "\n").encode())
    conn.settimeout(max(deadline - time.time(), 0.01) + 5)
    try:
      reply = json.loads(conn.makefile().readline() or "{}")
    except (TimeoutError, json.JSONDecodeError):
      reply = {"error": f"the coordinator at {address} did not start the job in time"}
  if not reply.get("ok"):
    raise DistributedError(reply.get("error") or f"the coordinator at {address} closed the connection")


def initialize(
  coordinator_address: str | None, num_processes: int | None, process_id: int | None, timeout_s: int = 120
) -> None:
  """Joins the job given explicitly, or the one JAX detects (TPU VM slices, SLURM); else stays single-process."""
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise DistributedError(
        "--coordinator_address, --num_processes and --process_id go together; give all three (or none)"
      )
    if not 0 <= process_id < num_processes:
      raise DistributedError(f"--process_id={process_id} must be in 0..{num_processes - 1} (--num_processes)")
    deadline = time.time() + timeout_s
    if num_processes > 1:
      if process_id == 0:
        _serve(coordinator_address, num_processes, deadline)
      else:
        _join(coordinator_address, num_processes, process_id, deadline)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need it; others ignore it
    jax.distributed.initialize(
      coordinator_address, num_processes, process_id, initialization_timeout=max(int(deadline - time.time()), 10)
    )
  elif _cluster_detected():
    jax.distributed.initialize()
  else:
    return
  _tag_log_records(jax.process_index())
  _log.info(
    "process %d of %d, %d local of %d devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def _cluster_detected() -> bool:
  """A cluster that jax.distributed.initialize() configures by itself: TPU VM slices (GCE or GKE), SLURM,
  Open MPI. Asks JAX's own detectors (a private API, pinned with jax), falling back to the environment."""
  try:
    from jax._src import clusters

    return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types if env.__name__ != "K8sCluster")
  except (ImportError, AttributeError):
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
      return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def _tag_log_records(process_index: int) -> None:
  """Every log line (ours and the libraries') names the process it came from."""
  make_record = logging.getLogRecordFactory()
  prefix = f"[process {process_index}] "

  def tagged(*args, **kwargs):
    record = make_record(*args, **kwargs)
    record.msg = prefix + str(record.msg)
    return record

  logging.setLogRecordFactory(tagged)
