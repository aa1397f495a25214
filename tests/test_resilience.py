"""Never lose a run: kill -9 / SIGTERM and resume bit-identically, corrupt checkpoints, NaN steps.

The end-to-end tests run the real CLI (`python -m spanlm.main`) on a one-layer
model so that each process takes seconds. More kill trials than the default one:
SPANLM_KILL_TRIALS=20 pytest tests/test_resilience.py -k kill
"""

import glob
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanlm import checkpoint as ckpt_lib
from spanlm import resilience

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 40
POISONED = "7,8"  # steps whose gradients are NaN in every run: skips must resume exactly too
TINY = ["--config=experiments/span_bert.py:tiny", "--config.model.num_layers=1",
        "--config.model.hidden_size=32", "--config.model.num_heads=2", "--config.model.intermediate_size=64",
        "--config.train.seq_len=32", "--config.train.batch_size=8", f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.checkpoint_every=2", "--config.train.log_every=5", "--config.train.eval_every=0",
        "--config.train.eval_batches=1", "--config.schedule.warmup_steps=2",
        f"--config.train.inject_nonfinite_steps={POISONED}"]


def _inspect_tool():
  spec = importlib.util.spec_from_file_location("inspect_checkpoint", os.path.join(ROOT, "tools/inspect_checkpoint.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


inspect_checkpoint = _inspect_tool()


def _env(extra):
  """One CPU device, as a user has, and XLA's cheap CPU compile options (conftest.py: level 0), the
  same in every run; `extra`: conftest.py's cli_no_plot (no curves PNG, which nothing here checks)."""
  return dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
              **extra)


def _cmd(workdir, *args):
  return [sys.executable, "-m", "spanlm.main", f"--workdir={workdir}", *TINY, *args]


def _committed(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cli_no_plot):
  """An uninterrupted run (it also prepares the data the other runs reuse)."""
  workdir = tmp_path_factory.mktemp("baseline")
  r = subprocess.run(_cmd(workdir, "--config.train.keep_checkpoints=100"), cwd=ROOT, env=_env(cli_no_plot),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  prepared = glob.glob(os.path.join(workdir, "data", "*"))
  assert len(prepared) == 1
  return workdir, prepared[0], r


def _run_until_signal(workdir, prepared, sig, rng, env):
  """Start a run, wait for a checkpoint newer than those on disk, then `sig` it at a random moment."""
  before = _committed(workdir)
  os.makedirs(workdir, exist_ok=True)
  logs = [open(os.path.join(workdir, f"{sig.name}.{name}"), "w+") for name in ("out", "err")]
  proc = subprocess.Popen(_cmd(workdir, f"--config.data.corpus={prepared}"), cwd=ROOT, env=env,
                          stdout=logs[0], stderr=logs[1], text=True)  # files: a full pipe would stall it
  deadline = time.time() + 300
  while (not _committed(workdir) or _committed(workdir) == before) and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  time.sleep(rng.uniform(0.0, 1.5))  # anywhere: mid-step, mid-async-write, between steps
  sent = proc.poll() is None
  if sent:
    proc.send_signal(sig)
  proc.wait(timeout=300)
  out, err = [(f.seek(0), f.read(), f.close())[1] for f in logs]
  return proc.returncode, out, err, sent


@pytest.mark.slow
def test_kill9_and_sigterm_at_random_moments_resume_bit_identically(baseline, tmp_path, cli_no_plot):
  base_dir, prepared, _ = baseline
  expected = inspect_checkpoint.inspect(base_dir, NUM_STEPS)["params_sha256"]
  rng = random.Random(int(os.environ.get("SPANLM_KILL_SEED", time.time())))
  for trial in range(int(os.environ.get("SPANLM_KILL_TRIALS", 1))):
    workdir = tmp_path / f"trial{trial}"
    # SIGKILL: no chance to clean up; whatever is on disk must be restorable or ignored.
    rc, _, err, sent = _run_until_signal(workdir, prepared, signal.SIGKILL, rng, _env(cli_no_plot))
    assert rc == (-signal.SIGKILL if sent else 0), err[-3000:]
    killed_at = [line.split("step ")[1].split("/")[0] for line in err.splitlines() if "| loss" in line][-1:]
    on_disk = (_committed(workdir), sorted(os.listdir(workdir / "checkpoints")))
    # SIGTERM (preemption): finish the step, checkpoint it, exit 0.
    rc, out, err, sent = _run_until_signal(workdir, prepared, signal.SIGTERM, rng, _env(cli_no_plot))
    assert rc == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    if sent and not result.get("complete") and result["step"] < NUM_STEPS:
      assert result.get("preempted") and "preemption signal (SIGTERM)" in err
      assert _committed(workdir)[-1] == result["step"]  # the checkpoint is at the step reached
    # Rerun the same command to the end.
    r = subprocess.run(_cmd(workdir, f"--config.data.corpus={prepared}"), cwd=ROOT, env=_env(cli_no_plot),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = inspect_checkpoint.inspect(workdir, NUM_STEPS)
    resumed = [line.split("at step ")[1] for line in r.stderr.splitlines() if "resumed from" in line]
    print(f"trial {trial}: SIGKILL {'sent' if sent else 'not sent'} (last logged step {killed_at}, on disk "
          f"{on_disk[1]}); SIGTERM -> { {k: result.get(k) for k in ('step', 'preempted', 'complete')} }; final run resumed at {resumed}")
    assert got["params_sha256"] == expected, f"trial {trial}: parameters differ from the uninterrupted run"
    assert got["data"]["iterator"] == {"next_index": NUM_STEPS}


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_counted(baseline):
  """Steps 7 and 8 had NaN gradients: parameters and optimizer state at 8 equal those at 6."""
  base_dir, _, r = baseline
  before, _ = ckpt_lib.read_raw(os.path.join(base_dir, "checkpoints", "6"))
  after, _ = ckpt_lib.read_raw(os.path.join(base_dir, "checkpoints", "8"))
  later, _ = ckpt_lib.read_raw(os.path.join(base_dir, "checkpoints", "10"))
  assert resilience.tree_digest(before["params"]) == resilience.tree_digest(after["params"])
  assert resilience.tree_digest(before["opt_state"]) == resilience.tree_digest(after["opt_state"])
  assert resilience.tree_digest(after["params"]) != resilience.tree_digest(later["params"])
  assert int(after["step"]) == 8  # the counter advanced with the data
  assert "step 7: non-finite loss/gradient" in r.stderr and "2 in this run" in r.stderr
  rows = [json.loads(line) for line in open(os.path.join(base_dir, "metrics.jsonl"))]
  train = [row for row in rows if "train/loss" in row]
  assert [row["train/nonfinite_steps"] for row in train][:2] == [0.0, 2.0]
  assert all(np.isfinite(row["train/loss"]) for row in train)  # means over applied steps only


# --- checkpoint atomicity and corruption (in process, no model needed) --------------------------
def _state(seed):
  k = jax.random.PRNGKey(seed)
  return {"step": jnp.asarray(seed, jnp.int32), "params": {"w": jax.random.normal(k, (64, 64)),
                                                           "b": jnp.arange(64.0)}}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0))


def _saved(tmp_path, steps=(1, 2, 3)):
  c = ckpt_lib.Checkpointer(tmp_path, max_to_keep=5, async_save=False)
  for s in steps:
    c.save(s, _state(s), {"iterator": {"next_index": s}})
  c.close()
  return os.path.join(tmp_path, "checkpoints")


def _largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    b = f.read(16)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(x ^ 0xFF for x in b))


def _delete_manifest(step_dir):
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _delete_data_item(step_dir):
  os.remove(os.path.join(step_dir, "data", "metadata"))


def _empty_step_dir(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


@pytest.mark.parametrize("damage", [_truncate, _flip, _delete_manifest, _delete_data_item, _empty_step_dir])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, caplog):
  directory = _saved(tmp_path)
  damage(os.path.join(directory, "3"))
  c = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  step, state, data = c.restore_latest(_abstract())
  assert step == 2 and data == {"iterator": {"next_index": 2}}
  np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])
  assert "cannot be restored" in caplog.text
  assert c.all_steps() == [1, 2] and os.listdir(tmp_path / "checkpoints_corrupt")
  c.save(3, _state(3))  # the slot is free again
  c.close()


def test_flipped_bytes_are_caught_by_the_digest(tmp_path):
  directory = _saved(tmp_path, steps=(1,))
  _flip(os.path.join(directory, "1"))
  c = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  with pytest.raises(Exception, match="corrupt|SHA-256|restore"):
    c.restore(1, _abstract())
  with pytest.raises(ValueError):  # nothing intact left: an error, not a silent fresh start
    c.restore_latest(_abstract())
  assert c.all_steps() == [1]  # nothing is moved when there is nothing to fall back to


def test_missing_tree_metadata_is_harmless(tmp_path):
  """Orbax's _METADATA is not needed when restoring against an abstract tree; the digest confirms."""
  directory = _saved(tmp_path)
  os.remove(os.path.join(directory, "3", "state", "_METADATA"))
  c = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  step, state, _ = c.restore_latest(_abstract())
  assert step == 3
  np.testing.assert_array_equal(state["params"]["w"], _state(3)["params"]["w"])


def test_interrupted_write_is_never_restored(tmp_path):
  """A step dir without its rename (a tmp dir) or without commit marker is not a checkpoint."""
  directory = _saved(tmp_path, steps=(1, 2))
  shutil.copytree(os.path.join(directory, "2"), os.path.join(directory, "3.orbax-checkpoint-tmp-123"))
  c = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  assert c.all_steps() == [1, 2]
  assert c.restore_latest(_abstract())[0] == 2


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
  c = ckpt_lib.Checkpointer(tmp_path, async_save=False)

  def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(c._manager, "save", no_space)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"could not write a checkpoint .*\(while saving step 1\): No space left on device.*larger disk"):
    c.save(1, _state(1))


@pytest.mark.slow
def test_inspect_checkpoint_cli(baseline, capsys):
  base_dir, _, _ = baseline
  assert inspect_checkpoint.main([f"--workdir={base_dir}", "--step=10"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["step"] == 10 and out["state_step"] == 10 and NUM_STEPS in out["steps"]
  assert out["config"]["train"]["num_steps"] == NUM_STEPS
  raw, _ = ckpt_lib.read_raw(os.path.join(base_dir, "checkpoints", "10"))
  assert out["num_params"] == sum(np.size(x) for x in jax.tree.leaves(raw["params"])) > 0
  assert out["params_sha256"] == resilience.tree_digest(raw["params"])
  assert inspect_checkpoint.main([f"--workdir={base_dir}", "--step=9"]) == 2
  assert "no checkpoint of step 9" in capsys.readouterr().err


def test_tree_digest_is_order_and_container_independent():
  a = {"x": np.arange(3.0), "y": {"z": np.ones(2, np.int32)}}
  b = {"y": {"z": np.ones(2, np.int32)}, "x": np.arange(3.0)}
  assert resilience.tree_digest(a) == resilience.tree_digest(b)
  b["x"] = b["x"].copy()
  b["x"][1] = np.nextafter(1.0, 2.0)  # one ulp
  assert resilience.tree_digest(a) != resilience.tree_digest(b)


def test_step_monitor_counts_skips_spikes_and_stops():
  m = resilience.StepMonitor(max_consecutive=3, spike_window=20, spike_k=4.0)
  for i in range(20):
    m.observe(i, 5.0 + 0.01 * (i % 3), skipped=False)
  m.observe(20, 50.0, skipped=False)
  assert m.spikes == 1
  m.observe(21, float("nan"), skipped=True)
  m.observe(22, 5.0, skipped=False)  # a good step resets the streak
  m.observe(23, float("nan"), skipped=True)
  m.observe(24, float("inf"), skipped=True)
  with pytest.raises(resilience.NonFiniteError, match="3 consecutive steps"):
    m.observe(25, float("nan"), skipped=True)
  assert m.metrics() == {"nonfinite_steps": 4.0, "loss_spikes": 1.0}


def test_keep_if_selects_inside_jit():
  new, old = {"a": jnp.ones(3)}, {"a": jnp.zeros(3)}
  pick = jax.jit(lambda loss: resilience.keep_if(resilience.step_is_finite(loss, jnp.float32(1.0)), new, old))
  np.testing.assert_array_equal(pick(jnp.float32(1.0))["a"], 1.0)
  np.testing.assert_array_equal(pick(jnp.float32(np.nan))["a"], 0.0)
  np.testing.assert_array_equal(pick(jnp.float32(np.inf))["a"], 0.0)


def test_sigterm_sets_the_flag_and_restores_the_handler():
  previous = signal.getsignal(signal.SIGTERM)
  with resilience.PreemptionGuard() as guard:
    assert not guard.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert guard.reached(2) and guard.signal_name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is previous
