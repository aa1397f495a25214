"""Test-wide setup: 8 fake CPU devices, set before JAX is imported anywhere; the `gcs` fixture."""
import os
import socket
import subprocess
import sys
import time

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A GCS server (gcp-storage-emulator on 127.0.0.1) with a bucket named `bucket`, and the
  environment pointing gcsfs (STORAGE_EMULATOR_HOST) and TensorStore (TENSORSTORE_GCS_HTTP_URL,
  Orbax's backend) at it. Yields the server's URL."""
  pytest.importorskip("gcp_storage_emulator")
  pytest.importorskip("gcsfs")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
                             f"--port={port}", "--in-memory", "--default-bucket=bucket"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      if time.time() > deadline or server.poll() is not None:
        server.kill()
        pytest.fail("gcp-storage-emulator did not start")
      time.sleep(0.2)
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                           "SPANLM_DATA_CACHE", "SPANLM_CHECKPOINT_OCDBT")}
  # The emulator mishandles OCDBT's repeated manifest writes (spanlm/checkpoint.py): plain zarr.
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, SPANLM_CHECKPOINT_OCDBT="0",
                    SPANLM_DATA_CACHE=str(tmp_path_factory.mktemp("cache")))
  yield url
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.kill()
  server.wait()
