"""What a newcomer meets first: one clear line when something is wrong, not a library's internals."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from spanlm import checkpoint as ckpt_lib


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def test_damaged_checkpoint_is_one_clear_line_without_tensorstore_spec(tmp_path):
  """A truncated file: 'unreadable', not 'the config changed', and no TensorStore spec dump."""
  tree = {"embedding": jnp.ones((16, 8)), "w": jnp.ones((4,))}
  c = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  c.save(1, tree)
  manifests = glob.glob(str(tmp_path / "checkpoints" / "1" / "state" / "**" / "manifest.ocdbt"), recursive=True)
  assert manifests
  for f in manifests:
    os.truncate(f, 10)
  with pytest.raises(ckpt_lib.CheckpointError, match="step 1 .* is unreadable \\(a damaged or truncated file\\)") as e:
    c.restore_latest(_abstract(tree))
  message = str(e.value)
  assert "tensorstore_spec" not in message and "source locations" not in message and "\n" not in message
  assert "does not match the current model" not in message
  c.close()


def test_brief_strips_tensorstore_details():
  e = ValueError('DATA_LOSS: Error reading "w/.zarray": bad [tensorstore_spec=\'{"driver":"zarr"}\'] '
                 '[tensorstore_spec[1]=\'{"driver":"cast","dtype":"float32"}\'] '
                 "[source locations='tensorstore/kvstore/file.cc:12']")
  assert ckpt_lib.brief(e) == 'DATA_LOSS: Error reading "w/.zarray": bad'
