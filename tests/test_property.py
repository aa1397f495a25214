"""Property tests (hypothesis): corpus packing, the validation split and masking invariants.

Masking is jitted once per scheme at a few fixed shapes; hypothesis varies the
contents (token ids, row lengths, where specials sit, the RNG), not the shapes,
so the number of compilations stays small.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spanlm.objectives import masking
from spanlm.data import prepare
from spanlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID

SPECIALS = (PAD_ID, CLS_ID, SEP_ID)
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- packing and the validation split ----------------------------------------------------------
@FAST
@given(docs=st.lists(st.lists(st.integers(masking.NUM_RESERVED, 999), max_size=60), min_size=1, max_size=6),
       seq_len=st.integers(prepare.MIN_SEQ_LEN, 20))
def test_pack_document_loses_nothing_and_frames_every_row(docs, seq_len):
  for doc in docs:
    tokens = np.asarray(doc, np.int32)
    rows = prepare.pack_document(tokens, seq_len)
    assert rows.dtype == np.int32 and rows.shape == (-(-len(doc) // (seq_len - 2)), seq_len)
    body = []
    for i, row in enumerate(rows):
      assert row[0] == CLS_ID
      sep = np.flatnonzero(row == SEP_ID)
      assert len(sep) == 1 and sep[0] >= 2  # one [SEP], after at least one token
      assert np.all(row[sep[0] + 1:] == PAD_ID)
      if i < len(rows) - 1:
        assert sep[0] == seq_len - 1  # only a document's last row is short
      body.extend(row[1:sep[0]].tolist())
    assert body == doc  # every token, in order, each exactly once: rows are one document's


@FAST
@given(rows_per_doc=st.lists(st.integers(1, 50), min_size=1, max_size=12),
       fraction=st.sampled_from([0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9]))
def test_validation_split_is_exact_and_per_document(rows_per_doc, fraction):
  counts = prepare._validation_counts(rows_per_doc, fraction)
  total = sum(rows_per_doc)
  assert sum(counts) == math.ceil(fraction * total - 1e-12) >= 1
  assert all(0 <= k <= c for k, c in zip(counts, rows_per_doc))
  # Proportional: document d's share differs from f * C_d by less than one row.
  assert all(abs(k - fraction * c) < 1 + 1e-9 for k, c in zip(counts, rows_per_doc))


# --- masking -----------------------------------------------------------------------------------
B, L, V = 4, 32, 64
TABLE = np.random.default_rng(0).random(V) < 0.6  # which ids begin a word
TABLE[:masking.NUM_RESERVED] = False


@functools.lru_cache(maxsize=None)
def _masker(scheme, rate):
  table = jnp.asarray(TABLE)
  fns = {
      "token": lambda rng, ids: masking.mask_tokens(rng, ids, vocab_size=V, rate=rate),
      "whole_word": lambda rng, ids: masking.mask_whole_words(rng, ids, table, vocab_size=V, rate=rate),
      "span": lambda rng, ids: masking.mask_spans(rng, ids, table, vocab_size=V, rate=rate,
                                                  geometric_p=0.2, max_span=10),
  }
  return jax.jit(fns[scheme])


@st.composite
def batches(draw):
  """[B, L] ids: framed rows [CLS] t.. [SEP] [PAD].. of any length, or (hostile) specials anywhere."""
  ids = np.asarray(draw(st.lists(st.integers(masking.NUM_RESERVED - 1, V - 1), min_size=B * L,
                                 max_size=B * L)), np.int32).reshape(B, L)  # includes [MASK]/[UNK]
  layout = draw(st.sampled_from(["framed", "hostile"]))
  if layout == "framed":
    for b, n in enumerate(draw(st.lists(st.integers(0, L - 2), min_size=B, max_size=B))):
      ids[b, 0], ids[b, n + 1], ids[b, n + 2:] = CLS_ID, SEP_ID, PAD_ID
  else:
    where = np.asarray(draw(st.lists(st.integers(0, 3), min_size=B * L, max_size=B * L))).reshape(B, L)
    ids = np.where(where == 0, np.asarray(SPECIALS)[np.arange(B * L).reshape(B, L) % 3], ids)
  return ids


@pytest.mark.parametrize("scheme", ["token", "whole_word", "span"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=batches(), seed=st.integers(0, 2**31 - 1), rate=st.sampled_from([0.15, 0.4]))
@pytest.mark.slow
def test_masking_invariants(scheme, ids, seed, rate):
  out = jax.device_get(_masker(scheme, rate)(jax.random.PRNGKey(seed), jnp.asarray(ids)))
  for field in out:
    assert field.shape == (B, L)  # static shapes, whatever the contents
  assert out.input_ids.dtype == np.int32 and out.weights.dtype == np.float32
  assert np.all(np.isfinite(out.weights)) and set(np.unique(out.weights)) <= {0.0, 1.0}
  special = np.isin(ids, SPECIALS)
  masked = out.weights > 0
  np.testing.assert_array_equal(out.targets, ids)
  assert not np.any(masked & special)  # specials are never predicted...
  np.testing.assert_array_equal(out.input_ids[special], ids[special])  # ...nor corrupted
  np.testing.assert_array_equal(out.input_ids[~masked], ids[~masked])  # only predicted tokens change
  assert not np.any(np.isin(out.input_ids[masked], SPECIALS))  # replacements are never special
  assert np.all((out.input_ids >= 0) & (out.input_ids < V))
  maskable = (~special).sum(1)
  per_row = masked.sum(1)
  assert np.all(per_row <= masking.max_predictions(L, rate))  # the budget is never exceeded
  assert np.all(per_row <= maskable) and np.all(per_row[maskable == 0] == 0)
  if scheme == "token":  # word/span schemes skip a unit longer than the budget (documented)
    assert np.all(per_row[maskable > 0] >= 1)
  # Boundaries: inside the row, and outside the unit they bound.
  assert np.all((out.left >= 0) & (out.left < L) & (out.right >= 0) & (out.right < L))
  rows, cols = np.nonzero(masked)
  assert np.all((out.left[rows, cols] < cols) | (cols == 0))  # clamped only at the row's ends
  assert np.all((out.right[rows, cols] > cols) | (cols == L - 1))
  assert np.all(out.left[~masked] == 0) and np.all(out.right[~masked] == 0)
  assert np.all(out.span_id[~masked] == -1) and np.all(out.span_id[masked] >= 0)
