"""A GCS JSON API server on 127.0.0.1 (gcp-storage-emulator, requirements-dev.txt) for tests and benchmarks: gs://
paths without a network. Nothing a run imports needs it."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator


@contextlib.contextmanager
def local_gcs(bucket: str) -> Iterator[str]:
  """Runs the server with one in-memory bucket and points this process (and its children, through the
  environment) at it; yields "gs://<bucket>". The environment and gcsfs's clients are restored after."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "gcp_storage_emulator",
      "start",
      "--host=127.0.0.1",
      f"--port={port}",
      "--in-memory",
      f"--default-bucket={bucket}",
      "--quiet",
    ],  # fmt: skip
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  env = {
    "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
    "NO_GCE_CHECK": "true",  # google-auth looks for no cloud metadata server
  }
  saved = {k: os.environ.get(k) for k in env}
  try:
    deadline = time.time() + 30
    while True:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        if time.time() > deadline or server.poll() is not None:
          raise RuntimeError("the GCS emulator did not start; pip install -r requirements-dev.txt") from None
        time.sleep(0.2)
    os.environ.update(env)
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()  # a client made before now would talk to another endpoint
    yield f"gs://{bucket}"
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    server.terminate()
    server.wait(timeout=30)
