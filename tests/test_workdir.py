"""spanlm/workdir.py: paths, the config check before anything is written, and state checksums."""
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spanlm
from spanlm import resilience, train
from spanlm import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  c = spanlm.load_config(os.path.join(ROOT, "experiments", "bert.py:tiny"))
  c.model.num_layers, c.model.hidden_size = 1, 32
  return c


def _snapshot(folder):
  out = {}
  for dirpath, dirnames, filenames in os.walk(folder):
    for name in dirnames + filenames:
      p = os.path.join(dirpath, name)
      out[os.path.relpath(p, folder)] = (hashlib.sha256(open(p, "rb").read()).hexdigest()
                                         if os.path.isfile(p) else "dir")
  return out


def test_paths():
  assert str(workdir_lib.path("gs://bucket/run")) == "gs://bucket/run"
  assert str(workdir_lib.path("rel/dir")) == os.path.join(os.getcwd(), "rel", "dir")
  with pytest.raises(ValueError, match="the URL scheme s3:// is not supported"):
    workdir_lib.path("s3://bucket/run")
  assert workdir_lib.is_remote("gs://b/r") and not workdir_lib.is_remote("/tmp/x")


def test_mismatching_rerun_leaves_the_workdir_untouched(tmp_path):
  a = _config()
  wd = workdir_lib.Workdir(tmp_path)
  wd.write_config(a)
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  before = _snapshot(tmp_path)
  b = _config()
  b.model.hidden_size = 64
  with pytest.raises(ValueError, match=r"different config \(model.hidden_size 32 -> 64\)"):
    train.train_and_evaluate(b, str(tmp_path))
  assert _snapshot(tmp_path) == before
  longer = _config()
  longer.train.num_steps, longer.mesh.model = 5000, 2  # the loop's knobs and the mesh may change
  wd.check_config(longer)


def test_state_checksum_sees_one_flipped_bit_and_ignores_containers():
  x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
  tree = {"params": {"w": x, "b": np.arange(3, dtype=np.int32)}, "step": np.int32(4)}
  base = resilience.state_checksum(tree)
  flipped = x.copy()
  flipped.view(np.uint32)[3, 2] ^= 1 << 17
  assert resilience.state_checksum({**tree, "params": {**tree["params"], "w": flipped}}) != base
  sharded = jax.device_put(jnp.asarray(x), jax.sharding.NamedSharding(
      jax.make_mesh((8,), ("d",)), jax.sharding.PartitionSpec(None, None)))
  assert resilience.state_checksum({"step": np.int32(4), "params": {"b": tree["params"]["b"], "w": sharded}}) == base


def test_barrier_and_agreement_single_process():
  resilience.barrier("nothing_to_wait_for", timeout_s=1)
  assert resilience.all_agree(True) and not resilience.all_agree(False)
