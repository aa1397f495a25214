"""Multi-host through the CLI: 2 processes (CPU, gloo) train exactly like 1 process.

Each case runs `python -m spanlm.main --coordinator_address=... --num_processes=2 --process_id=i`
on a mesh whose axes span the processes: model=2 on 2 x 1 devices (each process a replica of
the other's batch), model=4 and fsdp=4 on 2 x 2, data=8 on 2 x 4. Each must equal the reference,
`python -m spanlm.main` on 1 process x 8 devices, in per-step loss (metrics.jsonl, relative 1e-5)
and final parameters. Every process loads only the rows of each global batch its devices hold
(parallel.batch_rows), so this fails if a process feeds the wrong rows, too few rows, or rows a
replica does not share. The data=8 case is a resume: a copy of the reference's workdir, cut back
to its checkpoint at step STOP, continues on 2 x 4.

Cost (the README's test command must fit in 8 minutes on 2 cores): 9 processes, each mostly
importing JAX and compiling. So the runs are tiny (1 layer, width 32, 4 heads, 16 tokens, 3
steps, a corpus of a few hundred rows prepared once), one reference serves every case (the
global batch of a step depends only on (seed, step, batch size)), and every process compiles
with XLA's cheap CPU backend options (FAST_XLA, the same for all runs, so the comparison is
like for like). A JAX persistent compilation cache would not help here: no two runs compile the
same program for the same devices.
"""
import gzip
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
        "--config.train.seq_len=16", "--config.train.batch_size=16", f"--config.train.num_steps={STEPS}",
        "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_batches=1",
        "--config.schedule.warmup_steps=1", "--config.optimizer.learning_rate=1e-2"]
# name: (processes, devices per process, mesh data/fsdp/model)
CASES = {"model2": (2, 1, (1, 1, 2)), "model4": (2, 2, (1, 1, 4)), "fsdp4": (2, 2, (1, 4, 1)),
         "data8": (2, 4, (8, 1, 1))}
# Unoptimised CPU code generation: compiles ~1/3 faster; the steps are milliseconds anyway.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

pytestmark = pytest.mark.slow


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _hide_matplotlib(base):
  """A folder for PYTHONPATH in which `import matplotlib` fails, so process 0 skips the curves
  PNG (3 s of CPU per run, not what this test checks)."""
  stub = base / "no_matplotlib" / "matplotlib"
  stub.mkdir(parents=True, exist_ok=True)
  (stub / "__init__.py").write_text("raise ImportError('matplotlib hidden by tests/test_multihost.py')\n")
  return str(stub.parent)


def _launch(workdir, corpus, stub, processes, devices, mesh, *extra):
  # No persistent compilation cache (conftest.py's): one process loading the other's program
  # deadlocked gloo's start-up.
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS") and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_XLA}", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([stub, ROOT, os.environ.get("PYTHONPATH", "")]))
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The 2-process CLI runs and the reference (1 process x 8 devices), started together; the
  data=8 resume starts from the reference's step-STOP checkpoint once the reference is done."""
  from spanlm.data import prepare, sample
  base = tmp_path_factory.mktemp("multihost")
  # A few hundred rows of 16 tokens, prepared once for every run (no run re-tokenizes).
  with gzip.open(sample.corpus_files()[0], "rt") as f:
    (base / "book.txt").write_text(f.read()[:20000])
  corpus = prepare.ensure_prepared(str(base / "book.txt"), str(base / "prep"), 16,
                                   tokenizer=sample.tokenizer_path())
  stub = _hide_matplotlib(base)
  started = []
  try:
    # The reference saves every step (the data=8 case resumes from its step STOP).
    ref = _launch(base / "ref", corpus, stub, 1, 8, CASES["data8"][2], "--config.train.checkpoint_every=1",
                  f"--config.train.keep_checkpoints={STEPS}")
    started.append(ref)
    for name, (processes, devices, mesh) in CASES.items():
      if name != "data8":
        started.append(_launch(base / name, corpus, stub, processes, devices, mesh))
    _wait(ref)
    # The reference cut back to step STOP is a run stopped there; it continues on 2 x 4.
    shutil.copytree(base / "ref", base / "data8", ignore=shutil.ignore_patterns("log*"))
    for step in range(STOP + 1, STEPS + 1):
      shutil.rmtree(base / "data8" / "checkpoints" / str(step))
    started.append(_launch(base / "data8", corpus, stub, *CASES["data8"]))
    for procs in started[1:]:
      _wait(procs)
  finally:
    for procs in started:
      for p, _ in procs:
        if p.poll() is None:
          p.kill()
  return base


def _max_rel(got, expected, steps):
  return max(abs(got[s] / expected[s] - 1) for s in steps)


@pytest.mark.parametrize("name", ["model2", "model4", "fsdp4"])
def test_two_processes_equal_one(runs, name):
  expected, got = _losses(runs / "ref"), _losses(runs / name)
  assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
  print(name, "max relative loss difference", _max_rel(got, expected, got))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-5)
  _assert_same_params(_params(runs / name), _params(runs / "ref"))


def test_stopped_on_one_process_resumes_on_two(runs):
  # data=8: the 1 x 8 run stopped at step STOP continues on 2 processes x 4 devices exactly as on 1 x 8.
  expected, got = _losses(runs / "ref"), _losses(runs / "data8")
  assert sorted(got) == list(range(1, STEPS + 1))  # the reference's rows after STOP were dropped, then rewritten
  log = next((runs / "data8").glob("log0.*")).read_text()
  assert f"resumed from {runs / 'data8' / 'checkpoints'} at step {STOP}" in log
  steps = range(STOP + 1, STEPS + 1)
  print("data8 (resumed) max relative loss difference", _max_rel(got, expected, steps))
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=1e-5)
  _assert_same_params(_params(runs / "data8"), _params(runs / "ref"))
