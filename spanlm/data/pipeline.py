"""Batches from a prepared split: a shuffled, sharded, checkpointable grain iterator.

The row order is a pure function of (seed, index): `MapDataset.shuffle` is a
random-access permutation and `repeat` reseeds it per epoch, so every epoch is
a fresh permutation and the iterator state is just a position, which is what
makes `get_state`/`set_state` exact and cheap.
"""
from __future__ import annotations

import grain
import numpy as np


class _Rows(grain.MapDataset):
  """Rows `rows` of each consecutive block of `batch` elements of `parent`, in order."""

  def __init__(self, parent: grain.MapDataset, batch: int, rows: np.ndarray):
    super().__init__(parent)
    self._batch, self._rows = batch, np.asarray(rows, np.int64)

  def __len__(self) -> int:
    return len(self._parent) // self._batch * len(self._rows)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, k = divmod(index, len(self._rows))
    return self._parent[step * self._batch + int(self._rows[k])]

  def __str__(self) -> str:
    return f"_Rows(batch={self._batch}, {len(self._rows)} rows)"


def train_iterator(source, *, global_batch_size: int, seed: int, rows=None, shuffle: bool = True,
                   num_workers: int = 0, prefetch: int = 2) -> grain.DatasetIterator:
  """Endless iterator over this process's rows of each global batch.

  The global batch of step s is elements [s*B, (s+1)*B) of the shuffled,
  repeated stream (B = global_batch_size): a pure function of (seed, s, B),
  whatever the number of processes, devices or the mesh. `rows` are the
  indices within the global batch this process loads, ascending
  (`parallel.batch_rows(mesh, B)`; None = all B, a single process); pass the
  batches to `parallel.global_batch(batch, mesh, B)`. Yields
  `{'input_ids': int32 [len(rows), seq_len], 'segment_ids': ...}`. The
  iterator state (`it.get_state()`, JSON) counts steps, so a run resumed on
  another mesh or number of processes continues with the same batches.
  `num_workers` > 0 reads and batches in that many processes, `prefetch`
  batches ahead each (tools/benchmark_input.py measures whether it is needed).
  """
  rows = np.arange(global_batch_size) if rows is None else np.asarray(rows, np.int64)
  if len(rows) == 0 or rows.min() < 0 or rows.max() >= global_batch_size or np.any(np.diff(rows) <= 0):
    raise ValueError(f"rows must be ascending indices into a global batch of {global_batch_size}, got "
                     f"{rows.tolist()[:8]}...")
  if len(source) < global_batch_size:
    raise ValueError(
        f"The split has only {len(source)} rows, fewer than one batch of {global_batch_size}; lower the "
        f"batch size or prepare more text (or a shorter seq_len).")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = _Rows(ds.repeat(None), global_batch_size, rows)
  ds = ds.batch(len(rows), drop_remainder=True).to_iter_dataset()
  if num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=prefetch))
  return iter(ds)


def eval_batches(source, *, batch_size: int, max_batches: int | None = None,
                 rows=None) -> list[dict[str, np.ndarray]]:
  """The split in order, as batches; the last one is filled up with all-[PAD] rows.

  Padding rows are all zeros ([PAD] = 0 everywhere), so they contain no
  maskable tokens and do not change masked-LM metrics; nothing is dropped.
  `rows` (ascending indices within a batch, `parallel.batch_rows`) loads only
  this process's rows of each batch; None = all of them.
  """
  return list(iter_eval_batches(source, batch_size=batch_size, max_batches=max_batches, rows=rows))


def iter_eval_batches(source, *, batch_size: int, max_batches: int | None = None, rows=None):
  """`eval_batches`, one batch read at a time (the training loop's held-out set: nothing read at start-up)."""
  rows = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
  num_batches = -(-len(source) // batch_size)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  for b in range(num_batches):
    loaded = [source[b * batch_size + int(r)] if b * batch_size + r < len(source) else None for r in rows]
    template = source[0]
    yield {k: np.stack([x[k] if x is not None else np.zeros_like(template[k]) for x in loaded])
           for k in template}
