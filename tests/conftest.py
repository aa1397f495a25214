"""Test-wide setup, before JAX is imported anywhere: 8 fake CPU devices, LLVM at optimisation
level 0, and one persistent compilation cache for the whole run (workers and subprocesses included).

The tests' programs are tiny, so compiling them costs far more than running them: level 0 halves
XLA:CPU's compile time (measured: 5.9 s -> 2.9 s CPU for a 30-layer toy gradient, same run time).

Many tests build the same tiny model in new objects (and the CLI tests in new processes), which
JAX's in-memory cache cannot share; the persistent cache, keyed by the compiled program, can. It
lives in a fresh temporary folder per run (set SPANLM_TEST_JAX_CACHE to keep one across runs), so
the suite's time is what a fresh clone sees. The multi-process tests do not use it (it deadlocked
gloo's start-up when one process loaded the other's program). Also here: the `gcs` fixture, and
`cli_no_plot` for the tests that start `python -m spanlm.main` subprocesses.
"""
import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process of the run (pytest-xdist workers inherit)
  _cache = os.environ.get("SPANLM_TEST_JAX_CACHE")
  if not _cache:
    _cache = tempfile.mkdtemp(prefix="spanlm-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def cli_no_plot(tmp_path_factory):
  """Environment entries for a `python -m spanlm.main` subprocess whose curves PNG is not what the
  test checks: a PYTHONPATH whose first entry is a `matplotlib` that raises ImportError, so the run
  logs one line instead of drawing curves.png (~3 s of CPU per run; spanlm.metrics.plot_curves).
  tests/test_cli.py keeps one run that draws it and checks the PNG."""
  stub = tmp_path_factory.mktemp("no_matplotlib")
  (stub / "matplotlib").mkdir()
  (stub / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by tests/conftest.py')\n")
  return {"PYTHONPATH": os.pathsep.join([str(stub), ROOT, os.environ.get("PYTHONPATH", "")])}


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core, at most 4 (each worker holds 8 fake devices and its own compiles)."""
  del config
  return max(1, min(os.cpu_count() or 1, 4))


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
