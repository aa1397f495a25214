"""Multi-host through the CLI: 2 processes (CPU, gloo) train exactly like 1 process.

Each case runs `python -m spanlm.main --coordinator_address=... --num_processes=2 --process_id=i`
on a mesh whose axes span the processes: model=2 on 2 x 1 devices (each process a replica of
the other's batch), model=4 and fsdp=4 on 2 x 2, data=8 on 2 x 4. Each must equal the reference,
1 process x 8 devices run in this test process, in per-step loss (metrics.jsonl, relative 1e-5)
and final parameters. Every process loads only the rows of each global batch its devices hold
(parallel.batch_rows), so this fails if a process feeds the wrong rows, too few rows, or rows a
replica does not share. The data=8 case is a resume: the reference stops after step STOP and a
copy of its workdir continues on 2 x 4.

The runs are tiny (1 layer, width 32, 4 heads, 32 tokens, 3 steps) and start together; most of
their cost is importing JAX.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from spanlm import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, STOP = 3, 1
TINY = ["--config=experiments/bert.py:tiny", "--config.model.num_layers=1",
        "--config.model.hidden_size=32", "--config.model.num_heads=4", "--config.model.intermediate_size=64",
        "--config.model.vocab_multiple=256", "--config.model.dropout_rate=0.1",
        "--config.train.seq_len=32", "--config.train.batch_size=16", f"--config.train.num_steps={STEPS}",
        "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_batches=1",
        "--config.schedule.warmup_steps=1", "--config.optimizer.learning_rate=1e-2"]
# name: (processes, devices per process, mesh data/fsdp/model)
CASES = {"model2": (2, 1, (1, 1, 2)), "model4": (2, 2, (1, 1, 4)), "fsdp4": (2, 2, (1, 4, 1)),
         "data8": (2, 4, (8, 1, 1))}

pytestmark = pytest.mark.slow


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, corpus, processes, devices, mesh, *extra):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "spanlm.main", f"--workdir={workdir}", *TINY, f"--config.data.corpus={corpus}",
         f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}", f"--config.mesh.model={mesh[2]}", *extra]
  if processes > 1:
    address = f"localhost:{_free_port()}"
    cmds = [cmd + [f"--coordinator_address={address}", f"--num_processes={processes}", f"--process_id={i}"]
            for i in range(processes)]
  else:
    cmds = [cmd]
  os.makedirs(workdir, exist_ok=True)
  logs = [open(os.path.join(workdir, f"log{i}.{len(os.listdir(workdir))}"), "w+") for i in range(len(cmds))]
  return [(subprocess.Popen(c, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log)
          for c, log in zip(cmds, logs)]


def _wait(procs, timeout=900):
  try:
    for p, log in procs:
      p.wait(timeout=timeout)
    for p, log in procs:
      log.seek(0)
      assert p.returncode == 0, log.read()[-3000:]
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
      log.close()


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _params(workdir, step=STEPS):
  state, _ = ckpt_lib.read_raw(os.path.join(workdir, "checkpoints", str(step)))
  return state["params"]


def _assert_same_params(a, b):
  import jax
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    # atol 1e-5 = 0.1% of one step at lr 1e-2: BERT's uncorrected Adam (m / (sqrt(v) + eps)) turns
    # fp32 reduction-order noise on near-zero gradients into up to ~3e-6 here (measured).
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def _config(mesh, **train):
  """The CLI's config (TINY) for an in-process run."""
  import spanlm
  c = spanlm.load_config(os.path.join(ROOT, TINY[0].split("=", 1)[1]))
  for flag in TINY[1:]:
    key, value = flag[len("--config."):].split("=", 1)
    group, field = key.split(".")
    try:
      c[group][field] = int(value)
    except ValueError:
      c[group][field] = float(value)
  c.mesh.data, c.mesh.fsdp, c.mesh.model = mesh
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The 2-process CLI runs (started together), and the reference: 1 process x 8 devices, in this one.

  The global batch of every step depends only on (seed, step, batch size), so one reference
  serves every mesh: each 2-process run must match it step by step.
  """
  from spanlm import train
  from spanlm.data import prepare, sample
  base = tmp_path_factory.mktemp("multihost")
  corpus = prepare.ensure_prepared(sample.corpus_files()[0], str(base / "prep"), 32,
                                   tokenizer=sample.tokenizer_path())
  started = []
  try:
    for name, (processes, devices, mesh) in CASES.items():
      if name != "data8":
        started.append(_launch(base / name, corpus, processes, devices, mesh))
    # Reference, stopped after step STOP (checkpointed); a copy of it resumes on 2 x 4.
    ref = base / "ref"
    c = _config(CASES["data8"][2], stop_at_step=STOP)
    c.data.corpus = corpus
    train.train_and_evaluate(c, str(ref))
    shutil.copytree(ref, base / "data8")
    started.append(_launch(base / "data8", corpus, *CASES["data8"]))
    c.train.stop_at_step = 0
    train.train_and_evaluate(c, str(ref))
    for procs in started:
      _wait(procs)
  finally:
    for procs in started:
      for p, _ in procs:
        if p.poll() is None:
          p.kill()
  return base


@pytest.mark.parametrize("name", ["model2", "model4", "fsdp4"])
def test_two_processes_equal_one(runs, name):
  expected, got = _losses(runs / "ref"), _losses(runs / name)
  assert sorted(got) == list(range(1, STEPS + 1))
  print(name, "max relative loss difference", max(abs(got[s] / expected[s] - 1) for s in got))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-5)
  _assert_same_params(_params(runs / name), _params(runs / "ref"))


def test_stopped_on_one_process_resumes_on_two(runs):
  # data=8: the 1 x 8 run stopped at step STOP continues on 2 processes x 4 devices exactly as on 1 x 8.
  expected, got = _losses(runs / "ref"), _losses(runs / "data8")
  assert sorted(got) == list(range(1, STEPS + 1))
  print("data8 (resumed) max relative loss difference",
        max(abs(got[s] / expected[s] - 1) for s in range(STOP + 1, STEPS + 1)))
  np.testing.assert_allclose([got[s] for s in range(STOP + 1, STEPS + 1)],
                             [expected[s] for s in range(STOP + 1, STEPS + 1)], rtol=1e-5)
  _assert_same_params(_params(runs / "data8"), _params(runs / "ref"))
