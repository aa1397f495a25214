"""Two-segment examples for BERT's NSP and ALBERT's SOP, built on device from a batch.

Next sentence prediction (Devlin et al. 2019, §3.1 "Task #2"): input
`[CLS] A [SEP] B [SEP]`, segment ids 0 for `[CLS] A [SEP]` and 1 for `B [SEP]`;
50% of the time B is the text that actually follows A (label 0, IsNext), 50% a
segment from another document (label 1, NotNext).
Sentence order prediction (Lan et al. 2020, §3.1): A and B are always two
consecutive segments of one document; 50% of the time they are swapped
(label 1 = swapped, 0 = in order). SOP's negatives share the topic, so the
task cannot be solved by topic prediction as NSP largely can.

Where pairs are built: here, inside the jitted step, from the rows of the
global batch (each row is a contiguous stretch of one document,
`[CLS] t_1 ... t_k [SEP] [PAD]...`, as `spanlm.data.prepare` writes it). Why not
at prepare time as `create_pretraining_data.py` does: (1) the prepared format
(input_ids/segment_ids rows, owned by the data pipeline) stays unchanged and
one prepared dataset serves MLM, NSP and SOP; (2) every step draws fresh split
points, negatives and swaps, as RoBERTa's dynamic masking does for masks, where
BERT had to duplicate its data 10 times (`dupe_factor`) to vary them; (3) it
costs one [B, L] gather on device.

Construction per row with k text tokens (special tokens dropped; the row's own
order kept) and budget n = min(k, L - 3) (three special tokens):
  split a ~ U{1, ..., n-1}; A = t_1..t_a, B = t_{a+1}..t_n (both contiguous).
  NSP NotNext: B is replaced by n - a consecutive tokens (fewer if that row is
  shorter) from a uniformly random offset of another row r' = (r + s) mod B,
  s ~ U{1, ..., B-1}: another row, hence (for corpora of more than a few
  documents) almost always another document.
  SOP swapped: the example is [CLS] B [SEP] A [SEP].
Deviation from the papers: segments are cut at token positions, not sentence
boundaries (prepared rows keep no sentence boundaries); BERT also calls a
segment "an arbitrary span of contiguous text".

Bad input: a row with fewer than 2 text tokens has no "next" segment to use.
Fallback: it stays a single segment (`[CLS] t [SEP]`, segment ids 0) with pair
weight 0, so it still trains MLM but not the pair head; the trainer logs the
count as `pair_fallback_rows`. A NotNext partner row with no text falls back to
IsNext with the actual continuation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from spanlm.objectives.masking import CLS_ID, PAD_ID, SEP_ID, special_mask

TASKS = ("nsp", "sop")


class Pairs(NamedTuple):
  input_ids: jax.Array  # [B, L] int32: [CLS] A [SEP] B [SEP] [PAD]...
  segment_ids: jax.Array  # [B, L] int32: 0 over [CLS] A [SEP], 1 over B [SEP], 0 on padding
  labels: jax.Array  # [B] int32: NSP 1 = NotNext; SOP 1 = swapped
  weights: jax.Array  # [B] float32: 0 for single-segment fallback rows
  split: jax.Array  # [B] int32: a, the number of text tokens of the first original segment


def _compact(input_ids):
  """Text tokens of each row moved to the front in order ([B, L], PAD after), and their count."""
  special = special_mask(input_ids)
  order = jnp.argsort(special, axis=-1, stable=True)
  return jnp.where(jnp.take_along_axis(special, order, 1), PAD_ID,
                   jnp.take_along_axis(input_ids, order, 1)), jnp.sum(~special, axis=-1)


def make_pairs(rng: jax.Array, input_ids: jax.Array, task: str) -> Pairs:
  """NSP or SOP examples from a batch of single-segment rows (see the module docstring)."""
  if task not in TASKS:
    raise ValueError(f"pair task {task!r}; choose one of {TASKS}")
  batch, seq_len = input_ids.shape
  content, k = _compact(input_ids)
  n = jnp.minimum(k, seq_len - 3)
  valid = n >= 2
  split_rng, coin_rng, shift_rng, offset_rng = jax.random.split(rng, 4)
  a = jnp.where(valid, jax.random.randint(split_rng, (batch,), 1, jnp.maximum(n, 2)), 0)
  coin = jax.random.bernoulli(coin_rng, 0.5, (batch,)) & valid
  rows = jnp.arange(batch)
  if task == "nsp":
    partner = (rows + jax.random.randint(shift_rng, (batch,), 1, max(batch, 2))) % batch
    k_partner = k[partner]
    coin = coin & (k_partner > 0) & (batch > 1)
    n2_random = jnp.minimum(n - a, k_partner)
    o2_random = jax.random.randint(offset_rng, (batch,), 0, jnp.maximum(k_partner - n2_random, 0) + 1)
    # (row, offset, length) of the first and second segments in `content` coordinates.
    s1, o1, n1 = rows, jnp.zeros_like(a), a
    s2 = jnp.where(coin, partner, rows)
    o2 = jnp.where(coin, o2_random, a)
    n2 = jnp.where(coin, n2_random, n - a)
  else:
    s1, s2 = rows, rows
    o1, n1 = jnp.where(coin, a, 0), jnp.where(coin, n - a, a)
    o2, n2 = jnp.where(coin, 0, a), jnp.where(coin, a, n - a)
  # Fallback rows: one segment of all (at most L - 2) text tokens, no second [SEP].
  n1 = jnp.where(valid, n1, jnp.minimum(k, seq_len - 2))
  n2 = jnp.where(valid, n2, -1)

  j = jnp.arange(seq_len)[None, :]
  n1c, n2c, o1c, o2c = n1[:, None], n2[:, None], o1[:, None], o2[:, None]
  first = jnp.take_along_axis(content, jnp.clip(o1c + j - 1, 0, seq_len - 1), 1)
  second = jnp.take_along_axis(content[s2], jnp.clip(o2c + j - n1c - 2, 0, seq_len - 1), 1)
  in_first = (j >= 1) & (j <= n1c)
  in_second = (j >= n1c + 2) & (j <= n1c + n2c + 1)
  ids = jnp.where(j == 0, CLS_ID, PAD_ID)
  ids = jnp.where(in_first, first, ids)
  ids = jnp.where(j == n1c + 1, SEP_ID, ids)
  ids = jnp.where(in_second, second, ids)
  ids = jnp.where((j == n1c + n2c + 2) & (n2c >= 0), SEP_ID, ids)
  segment_ids = ((j >= n1c + 2) & (j <= n1c + n2c + 2)).astype(jnp.int32)
  del s1
  return Pairs(ids.astype(jnp.int32), segment_ids, coin.astype(jnp.int32),
               valid.astype(jnp.float32), a.astype(jnp.int32))
