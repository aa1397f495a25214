"""Orbax checkpoints of the whole training state, restored against an abstract tree.

A checkpoint holds the TrainState (step, params, optimizer state, RNG key) and
the data iterator's state (JSON), so a resumed run sees the same batches it
would have seen had it never stopped. Restores always go through an abstract
tree (shapes, dtypes, shardings), which lets a checkpoint be restored straight
into the sharding of the current mesh.

Atomicity and corruption (docs/robustness.md). Orbax writes step N into
`N.orbax-checkpoint-tmp-*` and renames it to `N` only once every file is
written, so a crash mid-write leaves a tmp dir that `all_steps()` ignores. A
checkpoint can still be damaged later (truncated copy, bit rot, a deleted
file), and flipped bytes inside raw array data pass Orbax's own checks. So
each save also stores checksums of the state and of the parameters
(`resilience.state_checksum`: computed on device, where the shards live, on
every host; no array is copied to the host for it) in the JSON item;
`restore_latest` recomputes them after reading and, if the newest checkpoint
cannot be read or does not match, warns, moves it to `checkpoints_corrupt/`
and falls back to the previous one. With several processes the decision is
taken together: a step is used only if it restored intact on every process.

Paths are `etils.epath` (workdir.path), so the workdir may be gs://.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

from spanlm import resilience

DIGEST_KEY = "state_checksum"  # resilience.state_checksum of the whole TrainState
PARAMS_DIGEST_KEY = "params_checksum"  # ... of state.params alone (checked by NumPy restores too)


class CheckpointError(ValueError):
  """A checkpoint could not be written, or no stored checkpoint can be restored."""


def _write_errno(e: BaseException) -> int | None:
  """The errno behind a failed write: an OSError in `e`'s cause/context chain, or TensorStore's
  `[os_error_code='28']` inside the ValueError it raises for a failed file write."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError) and e.errno:
      return e.errno
    if match := re.search(r"os_error_code='(\d+)'", str(e)):
      return int(match.group(1))
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


# TensorStore appends the full JSON spec of the store (and C++ source locations) to every error:
# hundreds of characters of context, cache and driver settings after the one line that matters.
_TENSORSTORE_DETAIL = re.compile(r"\s*\[(?:tensorstore_spec(?:\[\d+\])?|source locations)='.*?'\]", re.S)


def brief(e: BaseException) -> str:
  """`e` as text without TensorStore's spec dumps."""
  return _TENSORSTORE_DETAIL.sub("", str(e))


def _is_data_loss(e: BaseException) -> bool:
  """TensorStore's error for unreadable stored bytes (a truncated or damaged file), raised as ValueError."""
  return str(e).startswith(("DATA_LOSS", "OUT_OF_RANGE"))


@functools.cache
def _no_replica_parallel_on_cpu():
  """Once per process: on CPU, each replicated array is written from one replica. Orbax's default
  splits it across the replicas, which compiles a slice per (device, shape): ~100 compiles, ~25 s of CPU for a tiny
  model on 8 fake devices, and nothing gained where every "device" shares one host's memory."""
  if jax.default_backend() == "cpu":
    from orbax.checkpoint._src.metadata import array_metadata_store
    handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                             use_replica_parallel=False)
    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # Orbax warns "... overriding jax.Array": that is this call
    try:
      ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
      logging.set_verbosity(level)


class Checkpointer:
  """Save/restore {'state': TrainState, 'data': iterator state} under workdir/checkpoints."""

  def __init__(self, workdir, max_to_keep: int = 3, async_save: bool = True,
               verify_digest: bool = True):
    from spanlm.paths import path
    self.workdir = path(workdir)
    self.directory = self.workdir / "checkpoints"
    self.verify_digest = verify_digest
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = self._open()
    self._drop_uncommitted()

  def _drop_uncommitted(self):
    """On object storage a step is written in place and committed by a marker file, so a killed
    writer leaves an uncommitted step folder that the next save of that step would trip over
    (locally Orbax writes to a tmp folder and renames). Process 0 removes such folders."""
    from spanlm.paths import is_remote
    if not is_remote(self.directory):
      return
    if jax.process_index() == 0 and self.directory.exists():
      committed = set(self._manager.all_steps())
      for d in self.directory.iterdir():
        if d.name.isdigit() and int(d.name) not in committed:
          logging.warning("removing the uncommitted (interrupted) checkpoint folder %s", d)
          d.rmtree()
    resilience.barrier("drop_uncommitted")
    self._manager.reload()

  def _open(self):
    _no_replica_parallel_on_cpu()
    # SPANLM_CHECKPOINT_OCDBT=0 writes one zarr store per array instead of Orbax's default OCDBT
    # database: gcp-storage-emulator (tests/test_gcs.py) answers OCDBT's second manifest write in
    # a process with a generation TensorStore rejects ("Malformed StorageGeneration").
    ocdbt = os.environ.get("SPANLM_CHECKPOINT_OCDBT", "1") != "0"
    return ocp.CheckpointManager(
        self.directory, options=self._options, item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(use_ocdbt=ocdbt),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict | None = None) -> bool:
    data = dict(data_state or {})
    if self.verify_digest:  # on device, every process (multi-host included), one pass
      data[DIGEST_KEY], data[PARAMS_DIGEST_KEY] = resilience.state_checksums(state, ("", "params/"))
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
    try:
      return self._manager.save(step, args=args, force=True)
    except Exception as e:  # the async write of the previous save surfaces here too
      self._raise_write_error(step, e)

  def _raise_write_error(self, step, e):
    code = _write_errno(e)
    if code is None:
      raise e
    hint = {errno.ENOSPC: "free some space or point --workdir at a larger disk",
            errno.EDQUOT: "free some space or point --workdir at a larger disk",
            errno.EFBIG: "the file size limit (ulimit -f) is too small for a checkpoint",
            errno.EACCES: "make it writable or choose another --workdir",
            errno.EROFS: "the filesystem is read-only; choose another --workdir"}.get(
                code, "check the disk and the directory's permissions")
    raise CheckpointError(
        f"could not write a checkpoint to {self.directory} (while saving step {step}): {os.strerror(code)} "
        f"({hint}). The checkpoints already written are intact.") from e

  def restore(self, step: int, abstract_state=None):
    """Restore into the shapes/dtypes/shardings of `abstract_state` (ShapeDtypeStructs), or,
    without one, as NumPy arrays in the saved tree (the parameters' checksum is verified)."""
    if abstract_state is None:
      state, data = read_raw(self.directory / str(step))
      data = dict(data)
      expected = data.pop(PARAMS_DIGEST_KEY, None)
      data.pop(DIGEST_KEY, None)
      if self.verify_digest and expected and "params" in state:
        actual = resilience.state_checksum(state["params"])
        if actual != expected:
          raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: the checksum of "
                                f"its parameters is {actual[:16]}..., it was saved as {expected[:16]}...")
      return state, data
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except (ValueError, KeyError, TypeError) as e:
      if _is_data_loss(e):
        raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable (a damaged or "
                              f"truncated file): {brief(e)}") from e
      raise ValueError(
          f"checkpoint step {step} in {self.directory} does not match the current model/optimizer "
          f"config (was the config changed since it was written?). Use a new --workdir, or restore "
          f"the original config. Cause: {brief(e)}") from e
    state, data = restored.state, dict(restored.data or {})
    expected = data.pop(DIGEST_KEY, None)
    data.pop(PARAMS_DIGEST_KEY, None)
    if self.verify_digest and expected:
      actual = resilience.state_checksum(state)
      if actual != expected:
        raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: the checksum of "
                              f"its state is {actual[:16]}..., it was saved as {expected[:16]}...")
    return state, data

  def restore_latest(self, abstract_state=None):
    """(step, state, data) of the newest checkpoint that restores intact, or None if there is none.

    With several processes each step is tried by all of them and used only if it
    restored intact on every one (`resilience.all_agree`): one decision, shared.
    Without `abstract_state`: NumPy arrays, see `restore`.

    An unreadable or corrupt checkpoint is logged and the previous one tried;
    once one restores, the newer broken ones are moved to
    workdir/checkpoints_corrupt/ (so the next save of that step has a free
    slot). If none restores (a changed config, say) nothing is moved and the
    newest one's error is raised.
    """
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored, error = self.restore(step, abstract_state), None
      except Exception as e:  # truncated/missing files surface as assorted errors from tensorstore
        restored, error = None, e
      if not resilience.all_agree(error is None):
        e = error or CheckpointError(f"checkpoint step {step} in {self.directory} failed to restore on "
                                     f"another process (see its log)")
        failures.append((step, e))
        logging.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the previous "
                        "one", step, self.directory, type(e).__name__, brief(e)[:500])
        continue
      for bad, _ in failures:
        self._quarantine(bad)
      if failures:
        logging.warning("resumed from step %d instead of %d; the unreadable checkpoints were moved "
                        "to %s", step, failures[0][0], self.workdir / "checkpoints_corrupt")
      return (step, *restored)
    if failures:
      step, e = failures[0]
      if isinstance(e, ValueError):
        raise e
      raise CheckpointError(f"no checkpoint in {self.directory} can be restored; the newest (step "
                            f"{step}) failed with {type(e).__name__}: {brief(e)}") from e
    return None

  def _quarantine(self, step: int) -> None:
    if jax.process_index() == 0:
      dest = self.workdir / "checkpoints_corrupt" / f"{step}-{int(time.time())}"
      dest.parent.mkdir(parents=True, exist_ok=True)
      _move_tree(self.directory / str(step), dest)
    resilience.barrier(f"quarantine_{step}")
    self._manager.reload()

  def wait(self):
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      self._raise_write_error(self.latest_step(), e)

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _move_tree(src, dst) -> None:
  """Move a directory (local: a rename; gs://: copy, then delete)."""
  from spanlm.paths import is_remote
  if not is_remote(src):
    os.rename(src, dst)
    return
  from spanlm.paths import copy_tree
  copy_tree(src, dst)
  src.rmtree()


def read_raw(step_dir):
  """(state tree as NumPy, data dict) of one step directory (local or gs://), without the model.

  Orbax restores the arrays from its own metadata (shapes, dtypes) as NumPy, so
  no abstract tree is needed and a checkpoint written on any topology (several
  hosts, a sharded mesh) reads on one CPU; the tree holds plain dicts and lists.
  """
  import json

  import numpy as np

  from spanlm.paths import path
  step_dir = path(step_dir)
  item = step_dir / "state"
  metadata = ocp.PyTreeCheckpointHandler().metadata(item)
  tree = getattr(metadata, "tree", metadata)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  data_path = step_dir / "data" / "metadata"  # where JsonSave puts the dict
  data = json.loads(data_path.read_text()) if data_path.exists() else {}
  return state, data
