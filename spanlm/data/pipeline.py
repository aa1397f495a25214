"""Batches from a prepared split: a shuffled, sharded, checkpointable grain iterator.

The row order is a pure function of (seed, index): `MapDataset.shuffle` is a
random-access permutation and `repeat` reseeds it per epoch, so every epoch is
a fresh permutation and the iterator state is just a position, which is what
makes `get_state`/`set_state` exact and cheap.
"""
from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np


def train_iterator(source, *, global_batch_size: int, seed: int, process_index: int | None = None,
                   process_count: int | None = None, shuffle: bool = True,
                   num_workers: int = 0, prefetch: int = 2) -> grain.DatasetIterator:
  """Endless iterator of this process's share of each global batch.

  Global example i of the (shuffled, repeated) stream goes to process
  i % process_count, so processes read disjoint rows and together cover each
  epoch. Yields `{'input_ids': int32 [local_batch, seq_len], 'segment_ids': ...}`
  with local_batch = global_batch_size // process_count. Save and restore the
  position with `it.get_state()` (a JSON-serialisable dict) / `it.set_state()`.
  `num_workers` > 0 reads and batches in that many processes, `prefetch`
  batches ahead each (tools/benchmark_input.py measures whether it is needed).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the "
                     f"{process_count} processes; pick a multiple of {process_count}.")
  if len(source) < global_batch_size:
    raise ValueError(
        f"The split has only {len(source)} rows, fewer than one batch of {global_batch_size}; lower the "
        f"batch size or prepare more text (or a shorter seq_len).")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)[process_index::process_count]
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True).to_iter_dataset()
  if num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=prefetch))
  return iter(ds)


def eval_batches(source, *, batch_size: int, max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
  """The split in order, as batches; the last one is filled up with all-[PAD] rows.

  Padding rows are all zeros ([PAD] = 0 everywhere), so they contain no
  maskable tokens and do not change masked-LM metrics; nothing is dropped.
  """
  return list(iter_eval_batches(source, batch_size=batch_size, max_batches=max_batches))


def iter_eval_batches(source, *, batch_size: int, max_batches: int | None = None):
  """`eval_batches`, one batch read at a time (the training loop's held-out set: nothing read at start-up)."""
  num_batches = -(-len(source) // batch_size)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  for b in range(num_batches):
    rows = [source[i] for i in range(b * batch_size, min((b + 1) * batch_size, len(source)))]
    batch: dict[str, Any] = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    missing = batch_size - len(rows)
    yield {k: np.pad(v, [(0, missing)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
