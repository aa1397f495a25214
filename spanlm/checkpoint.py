"""Orbax checkpoints of the whole training state, restored against an abstract tree.

A checkpoint holds the TrainState (step, params, optimizer state, RNG key) and
the data iterator's state (JSON), so a resumed run sees the same batches it
would have seen had it never stopped. Restores always go through an abstract
tree (shapes, dtypes, shardings), which lets a checkpoint be restored straight
into the sharding of the current mesh.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Save/restore {'state': TrainState, 'data': iterator state} under workdir/checkpoints."""

  def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict | None = None) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    return self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state):
    """Restore into the shapes/dtypes/shardings of `abstract_state` (ShapeDtypeStructs)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint step {step} in {self.directory} does not match the current model/optimizer "
          f"config (was the config changed since it was written?). Use a new --workdir, or restore "
          f"the original config. Cause: {e}") from e
    return restored.state, dict(restored.data or {})

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
