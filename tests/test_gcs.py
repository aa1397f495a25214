"""A gs:// workdir end to end, against a real GCS server (gcp-storage-emulator on 127.0.0.1).

gcsfs (etils.epath's gs:// backend) finds the server through STORAGE_EMULATOR_HOST and
TensorStore (Orbax's backend) through TENSORSTORE_GCS_HTTP_URL. A tiny run with
--workdir=gs://bucket/run is killed (SIGKILL) after its first checkpoint and rerun; its final
parameters must be bit-identical (tools/inspect_checkpoint.py's digest) to an uninterrupted local
run's, fine-tuning must start from the gs:// workdir, and nothing may land in a local folder
named `gs:`.
"""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
TINY = [f"--config={ROOT}/experiments/bert.py:tiny", "--config.model.num_layers=1", "--config.model.hidden_size=32",
        "--config.model.num_heads=2", "--config.model.intermediate_size=64", "--config.train.seq_len=32",
        "--config.train.batch_size=8", f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=2",
        "--config.train.log_every=2", "--config.train.eval_every=0", "--config.train.eval_batches=1",
        "--config.schedule.warmup_steps=2"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A GCS server with a bucket named `bucket`; the environment pointing gcsfs and TensorStore at it."""
  port = _free_port()
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


def _config(corpus, tokenizer):
  import spanlm
  c = spanlm.load_config(os.path.join(ROOT, "experiments", "bert.py:tiny"))
  for flag in TINY[1:]:
    key, value = flag[len("--config."):].split("=", 1)
    group, field = key.split(".")
    c[group][field] = int(value)
  c.data.corpus, c.data.tokenizer = corpus, tokenizer
  return c


def _env():
  return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def _inspect():
  spec = importlib.util.spec_from_file_location("inspect_checkpoint", os.path.join(ROOT, "tools/inspect_checkpoint.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.inspect


@pytest.mark.slow
def test_gs_workdir_survives_sigkill_and_matches_local(gcs, tmp_path):
  from etils import epath

  from spanlm import train
  from spanlm.data import sample
  corpus, tokenizer = sample.corpus_files()[0], sample.tokenizer_path()
  # The uninterrupted local reference, in this process (8 devices, as the CLI run below).
  train.train_and_evaluate(_config(corpus, tokenizer), str(tmp_path / "local"))

  run = "gs://bucket/run"
  cmd = [sys.executable, "-m", "spanlm.main", f"--workdir={run}", *TINY, f"--config.data.corpus={corpus}",
         f"--config.data.tokenizer={tokenizer}"]
  log = open(tmp_path / "killed.log", "w+")
  proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 900  # generous: a loaded CI machine starts JAX slowly
    # Killed once step 2 is committed (Orbax's marker on object storage), i.e. mid-run.
    while not (epath.Path(run) / "checkpoints" / "2" / "commit_success.txt").exists():
      assert proc.poll() is None and time.time() < deadline, (log.seek(0), log.read()[-3000:])[1]
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not (epath.Path(run) / "checkpoints" / str(STEPS)).exists()  # it really stopped mid-run
  r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)  # the rerun
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from {run}/checkpoints at step" in r.stderr

  def tool(*args):
    r = subprocess.run([sys.executable, *args], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout

  remote = json.loads(tool(os.path.join(ROOT, "tools", "inspect_checkpoint.py"), f"--workdir={run}"))
  local = _inspect()(str(tmp_path / "local"))
  assert remote["step"] == local["step"] == STEPS
  assert remote["params_sha256"] == local["params_sha256"]  # bit-identical to the uninterrupted run
  assert remote["workdir"] == run and remote["config"]["train"]["num_steps"] == STEPS
  assert remote["params_checksum_ok"] is True
  rows = [json.loads(line) for line in (epath.Path(run) / "metrics.jsonl").read_text().splitlines()]
  # Each logged step once: the rerun drops the rows the killed run wrote after its checkpoint.
  assert sorted(r["step"] for r in rows if "train/loss" in r) == list(range(2, STEPS + 1, 2))

  # Fine-tuning starts from the gs:// workdir: its encoder is the pretrained one, bit for bit.
  from spanlm import checkpoint, resilience
  out = tool("-c", "from spanlm import finetune, resilience; c = finetune.finetune_config(); "
             f"c.init_checkpoint = {run!r}; _, params, _ = finetune.load_encoder(c); "
             "print(resilience.tree_digest(params))")
  raw, _ = checkpoint.read_raw(tmp_path / "local" / "checkpoints" / str(STEPS))
  assert out.strip().splitlines()[-1] == resilience.tree_digest(raw["params"]["encoder"])

  for folder in (ROOT, str(tmp_path), os.getcwd()):
    assert not os.path.exists(os.path.join(folder, "gs:")), folder


def test_bad_urls_are_one_line(gcs, tmp_path):
  from spanlm import workdir
  with pytest.raises(ValueError, match=r"s3://b/run: the URL scheme s3:// is not supported"):
    workdir.Workdir("s3://b/run")
  with pytest.raises(ValueError, match=r"cannot access gs://no-such-bucket/run .*GOOGLE_APPLICATION_CREDENTIALS"):
    workdir.Workdir("gs://no-such-bucket/run").check_writable()
  r = subprocess.run([sys.executable, "-m", "spanlm.main", "--workdir=gs://no-such-bucket/run", *TINY],
                     cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: cannot access gs://no-such-bucket/run") and "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "gs:")
