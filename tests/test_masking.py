"""Tests for spanlm.masking: invariants of every scheme, checked against NumPy."""

import functools
import math
import types

import hypothesis
import hypothesis.strategies as st
import jax
import ml_collections
import numpy as np
import pytest

from spanlm.objectives import masking

V = 1000  # synthetic vocabulary: 5..499 begin a word, 500..999 continue one
TABLE = np.zeros(V, bool)
TABLE[5:500] = True
SPECIALS = (masking.PAD_ID, masking.CLS_ID, masking.SEP_ID)
SCHEMES = masking.SCHEMES
PAPER_MEAN_SPAN = 3.8  # SpanBERT §3.1: Geo(0.2) clipped at 10 words


@functools.cache
def jitted(scheme, **kwargs):
  """One jitted masking function per (scheme, static kwargs); jit caches per shape."""
  if scheme == "token":
    fn = functools.partial(masking.mask_tokens, vocab_size=V, **kwargs)
    return jax.jit(lambda rng, ids: fn(rng, ids))
  fn = {"whole_word": masking.mask_whole_words, "ngram": masking.mask_ngrams}.get(scheme, masking.mask_spans)
  fn = functools.partial(fn, vocab_size=V, **kwargs)
  return jax.jit(lambda rng, ids: fn(rng, ids, TABLE))


def run(scheme, ids, seed=0, **kwargs):
  out = jitted(scheme, **kwargs)(jax.random.key(seed), ids)
  return masking.MaskedBatch(*map(np.asarray, out))


def random_text(rng, n):
  """n tokens of random words of 1-4 pieces, with the odd [UNK]."""
  toks = []
  while len(toks) < n:
    k = rng.integers(1, 5)
    toks += [rng.integers(5, 500)] + list(rng.integers(500, V, k - 1))
  toks = np.array(toks[:n])
  return np.where(rng.random(n) < 0.01, masking.UNK_ID, toks)


def make_batch(seed, batch, seq_len, min_len=None):
  """[CLS] text [SEP] [PAD]..., variable lengths; a few segment pairs and degenerate rows."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, seq_len), np.int32)
  for b in range(batch):
    n = rng.integers(min_len or seq_len // 4, seq_len - 1)
    row = [masking.CLS_ID, *random_text(rng, n), masking.SEP_ID]
    if b % 16 == 1:  # a pair: [CLS] A [SEP] B [SEP]
      row[n // 2] = masking.SEP_ID
    ids[b, : len(row)] = row
  ids[0] = masking.PAD_ID  # nothing maskable
  ids[2] = masking.PAD_ID
  ids[2, :3] = [masking.CLS_ID, 7, masking.SEP_ID]  # one maskable token
  return ids


def is_special(ids):
  return np.isin(ids, SPECIALS)


def np_budget(ids, rate):
  """round(rate * n) in float32 as on device, >= 1 if anything is maskable."""
  n = (~is_special(ids)).sum(1)
  budget = np.round(np.float32(rate) * n.astype(np.float32)).astype(int)
  budget = np.where(n > 0, np.maximum(budget, 1), 0)
  return np.minimum(np.minimum(budget, n), masking.max_predictions(ids.shape[1], rate))


def np_words(ids):
  """(word index per position, -1 at specials; word-start flags)."""
  special = is_special(ids)
  prev_special = np.pad(special[:, :-1], ((0, 0), (1, 0)), constant_values=True)
  starts = ~special & (TABLE[ids] | prev_special)
  word = np.where(special, -1, np.cumsum(starts, 1) - 1)
  return word, starts


def spans_of(span_id):
  """[(row, id, first, last)] for every masked unit."""
  out = []
  for b, row in enumerate(span_id):
    for u in np.unique(row[row >= 0]):
      pos = np.nonzero(row == u)[0]
      out.append((b, u, pos[0], pos[-1]))
  return out


def check_invariants(ids, out, rate, scheme):
  """Everything that must hold for any input, any scheme."""
  batch, seq_len = ids.shape
  masked = out.weights > 0
  assert out.input_ids.shape == out.weights.shape == out.span_id.shape == (batch, seq_len)
  assert out.input_ids.dtype == out.targets.dtype == out.left.dtype == np.int32
  assert out.right.dtype == out.span_id.dtype == np.int32 and out.weights.dtype == np.float32
  np.testing.assert_array_equal(out.targets, ids)
  assert set(np.unique(out.weights)) <= {0.0, 1.0}
  # Specials are never masked nor changed; unmasked tokens are never changed.
  assert not masked[is_special(ids)].any()
  np.testing.assert_array_equal(out.input_ids[~masked], ids[~masked])
  changed = masked & (out.input_ids != ids) & (out.input_ids != masking.MASK_ID)
  assert (out.input_ids[changed] >= masking.NUM_RESERVED).all()
  assert (out.input_ids[changed] < V).all()
  # Budget.
  count = masked.sum(1)
  assert (count <= np_budget(ids, rate)).all()
  assert count.max(initial=0) <= masking.max_predictions(seq_len, rate)
  # Unmasked bookkeeping is zeroed.
  assert (out.span_id[~masked] == -1).all()
  assert (out.left[~masked] == 0).all() and (out.right[~masked] == 0).all()
  # Units: contiguous, numbered 0.. left to right, boundaries just outside.
  for b, u, first, last in spans_of(out.span_id):
    unit = out.span_id[b] == u
    assert unit[first : last + 1].all() and unit.sum() == last - first + 1
    np.testing.assert_array_equal(out.left[b, unit], max(first - 1, 0))
    np.testing.assert_array_equal(out.right[b, unit], min(last + 1, seq_len - 1))
    assert u == 0 or (out.span_id[b, :first] == u - 1).any()
  # Whole words: a masked word is masked entirely, units start at a word start.
  if scheme != "token":
    word, starts = np_words(ids)
    same_word = (word[:, 1:] == word[:, :-1]) & (word[:, 1:] >= 0)
    assert (masked[:, 1:] == masked[:, :-1])[same_word].all()
    first = masked & (out.span_id != np.pad(out.span_id[:, :-1], ((0, 0), (1, 0)), constant_values=-1))
    assert starts[first].all()
  if scheme == "token":
    assert all(first == last for _, _, first, last in spans_of(out.span_id))
  if scheme == "whole_word":  # each unit is one word
    word, _ = np_words(ids)
    for b, u, first, last in spans_of(out.span_id):
      assert word[b, first] == word[b, last] and (first == 0 or word[b, first - 1] != word[b, first])


@pytest.fixture(scope="module")
def batch128():
  return make_batch(0, 256, 128)


@pytest.fixture(scope="module")
def batch512():
  return make_batch(1, 256, 512)


@pytest.fixture(scope="module")
def outputs(batch128, batch512):
  return {
      (scheme, ids.shape[1]): run(scheme, ids)
      for scheme in SCHEMES
      for ids in (batch128, batch512)
  }


@pytest.mark.parametrize("seq_len", [128, 512])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_invariants(scheme, seq_len, outputs, batch128, batch512):
  ids = batch128 if seq_len == 128 else batch512
  check_invariants(ids, outputs[scheme, seq_len], 0.15, scheme)


@pytest.mark.parametrize("seq_len", [128, 512])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_rate(scheme, seq_len, outputs, batch128, batch512):
  ids = batch128 if seq_len == 128 else batch512
  count = outputs[scheme, seq_len].weights.sum(1)
  budget = np_budget(ids, 0.15)
  n = (~is_special(ids)).sum(1)
  if scheme == "token":
    np.testing.assert_array_equal(count, budget)
    assert abs(count.sum() / n.sum() - 0.15) < 0.002
  else:
    assert (count[budget > 0] / budget[budget > 0]).mean() >= 0.95
    assert count.sum() / n.sum() > 0.95 * 0.15


def test_degenerate_rows(outputs):
  for scheme in SCHEMES:
    out = outputs[scheme, 128]
    assert out.weights[0].sum() == 0  # all [PAD]
    np.testing.assert_array_equal(out.weights[2, :3], [0, 1, 0])  # [CLS] x [SEP]
    assert (out.left[2, 1], out.right[2, 1], out.span_id[2, 1]) == (0, 2, 0)


def test_unk_is_maskable(outputs, batch128):
  assert (outputs["token", 128].weights[batch128 == masking.UNK_ID] > 0).any()


def replacement_fractions(ids, out):
  masked = out.weights > 0
  new, old = out.input_ids[masked], ids[masked]
  is_mask = new == masking.MASK_ID
  return is_mask, ~is_mask & (new != old), new == old


def assert_binomial(hits, p, what):
  n = hits.size
  tol = 5 * math.sqrt(p * (1 - p) / n)
  assert abs(hits.mean() - p) < tol, f"{what}: {hits.mean():.4f} vs {p:.4f} ± {tol:.4f} (n={n})"


# A random replacement equals the original with probability 1 / (V - NUM_RESERVED).
P_SAME = 1 / (V - masking.NUM_RESERVED)


@pytest.mark.parametrize("scheme", ["token", "whole_word"])
def test_80_10_10_per_token(scheme, outputs, batch128, batch512):
  parts = [replacement_fractions(ids, outputs[scheme, ids.shape[1]]) for ids in (batch128, batch512)]
  is_mask, is_random, is_same = (np.concatenate(p) for p in zip(*parts))
  assert_binomial(is_mask, 0.8, "[MASK]")
  assert_binomial(is_random, 0.1 * (1 - P_SAME), "random")
  assert_binomial(is_same, 0.1 + 0.1 * P_SAME, "unchanged")


def test_span_decision_is_per_span(outputs, batch128, batch512):
  outcomes = []
  for ids in (batch128, batch512):
    out = outputs["span", ids.shape[1]]
    for b, u, first, last in spans_of(out.span_id):
      new, old = out.input_ids[b, first : last + 1], ids[b, first : last + 1]
      if (new == masking.MASK_ID).any():
        assert (new == masking.MASK_ID).all()
        outcomes.append("mask")
      elif (new != old).any():
        outcomes.append("random")  # every token random, some may equal their original
      else:
        outcomes.append("same")
  outcomes = np.array(outcomes)
  assert_binomial(outcomes == "mask", 0.8, "[MASK] spans")
  # A random span looks unchanged only if every token's draw hits its original: ignorable.
  assert_binomial(outcomes == "random", 0.1, "random spans")
  assert_binomial(outcomes == "same", 0.1, "kept spans")


def test_span_length_probs():
  probs = masking._span_length_probs(0.2, 10)
  lengths = np.arange(1, 11)
  np.testing.assert_allclose(probs, 0.2 * 0.8 ** (lengths - 1) / (1 - 0.8**10))
  assert abs(probs @ lengths - PAPER_MEAN_SPAN) < 0.01


def span_words(ids, out):
  word, _ = np_words(ids)
  return np.array([word[b, last] - word[b, first] + 1 for b, _, first, last in spans_of(out.span_id)])


def test_span_lengths_in_words(outputs, batch128, batch512):
  for ids in (batch128, batch512):
    lengths = span_words(ids, outputs["span", ids.shape[1]])
    assert lengths.min() >= 1 and lengths.max() <= 10
  # Full rows of one-piece words, as most SentencePiece words are: the budget
  # (76 words) rarely binds, so accepted lengths stay close to the sampling
  # distribution. Overlap rejection favours short spans, hence the lower mean.
  rng = np.random.default_rng(3)
  ids = np.full((256, 512), masking.SEP_ID, np.int32)
  ids[:, 0] = masking.CLS_ID
  ids[:, 1:-1] = rng.integers(5, 500, (256, 510))
  lengths = span_words(ids, run("span", ids))
  probs = masking._span_length_probs(0.2, 10)
  freqs = np.bincount(lengths, minlength=11)[1:] / len(lengths)
  assert len(freqs) == 10
  assert PAPER_MEAN_SPAN - 0.5 < lengths.mean() < PAPER_MEAN_SPAN
  assert 0.5 * np.abs(freqs - probs).sum() < 0.06  # total variation


def test_first_span_length_distribution():
  """Candidate 0 of a long row is always accepted and, if its start word is at
  least max_span words from the end, never clipped nor (budget >= 40 tokens >=
  10 words of <= 4 pieces) shortened: its length is an unbiased sample."""
  ids = make_batch(2, 512, 512, min_len=300)[3:]
  ids = ids[(ids == masking.SEP_ID).sum(1) == 1]  # single segments
  maskable = ~is_special(ids)
  word, starts = np_words(ids)
  assert np_budget(ids, 0.15).min() >= 40
  sample = jax.jit(jax.vmap(functools.partial(
      masking._sample_spans,
      log_probs=np.log(masking._span_length_probs(0.2, 10)),
      num_candidates=masking._num_span_candidates(512, 0.15),
  )))
  lengths = []
  for seed in range(8):
    rngs = jax.random.split(jax.random.key(seed), len(ids))
    unit = np.asarray(sample(rngs, maskable, starts, np_budget(ids, 0.15)))
    for b in range(len(ids)):
      pos = np.nonzero(unit[b] == 0)[0]
      first_word, last_word = word[b, pos[0]], word[b, pos[-1]]
      if first_word <= word[b].max() - 10:
        lengths.append(last_word - first_word + 1)
  lengths = np.array(lengths)
  probs = masking._span_length_probs(0.2, 10)
  n = len(lengths)
  assert n > 3000
  counts = np.bincount(lengths, minlength=11)[1:]
  assert counts.sum() == n  # nothing longer than 10 words
  assert abs(lengths.mean() - probs @ np.arange(1, 11)) < 5 * lengths.std() / math.sqrt(n)
  chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum()
  assert chi2 < 33.7  # chi-square, 9 dof, p = 1e-4
  assert 0.5 * np.abs(counts / n - probs).sum() < 0.04  # total variation


# [CLS] a b c d [SEP] [PAD] [PAD]: two words (a b) and (c d).
ROW = [masking.CLS_ID, 10, 600, 11, 601, masking.SEP_ID, 0, 0]
# [CLS] a b [SEP] c d [SEP] [PAD]: one-word segments; spans cannot cross [SEP].
PAIR = [masking.CLS_ID, 10, 600, masking.SEP_ID, 11, 601, masking.SEP_ID, 0]


def configurations(out):
  """Per row: sorted tuple of (first, last, left, right) of its units."""
  return [
      tuple((f, l, out.left[b, f], out.right[b, f]) for bb, _, f, l in spans_of(out.span_id) if bb == b)
      for b in range(len(out.span_id))
  ]


@pytest.mark.parametrize(
    "scheme, row, rate, expected, possible",
    [
        # Budget 2 tokens: exactly one of the two words.
        ("span", ROW, 0.5, [((1, 2, 0, 3),), ((3, 4, 2, 5),)], []),
        ("whole_word", ROW, 0.5, [((1, 2, 0, 3),), ((3, 4, 2, 5),)], []),
        # Budget 4: one 2-word span or two 1-word spans; one word if candidates run out.
        ("span", ROW, 1.0, [((1, 4, 0, 5),), ((1, 2, 0, 3), (3, 4, 2, 5))], [((1, 2, 0, 3),), ((3, 4, 2, 5),)]),
        # Spans stop at [SEP], which may be a boundary.
        ("span", PAIR, 1.0, [((1, 2, 0, 3), (4, 5, 3, 6))], [((1, 2, 0, 3),), ((4, 5, 3, 6),)]),
        # Budget 1: one token, boundaries its neighbours.
        ("token", ROW, 0.25, [((i, i, i - 1, i + 1),) for i in range(1, 5)], []),
    ],
)
def test_handmade_boundaries(scheme, row, rate, expected, possible):
  ids = np.array([row] * 64, np.int32)  # every row draws its own randomness
  out = run(scheme, ids, rate=rate)
  check_invariants(ids, out, rate, scheme)
  seen = configurations(out)
  assert set(seen) <= set(expected + possible)
  assert set(expected) <= set(seen)
  if scheme == "span" and rate == 1.0:  # most rows reach the 4-token budget
    assert (out.weights.sum(1) == 4).mean() > 0.75


@pytest.mark.parametrize("scheme", SCHEMES)
def test_degenerate_batch(scheme):
  ids = np.zeros((4, 8), np.int32)
  ids[1, :3] = [masking.CLS_ID, 9, masking.SEP_ID]
  ids[2, :2] = [masking.CLS_ID, masking.SEP_ID]
  ids[3, :1] = [9]  # no [CLS]: boundaries are clamped into the row
  out = run(scheme, ids)
  check_invariants(ids, out, 0.15, scheme)
  np.testing.assert_array_equal(out.weights.sum(1), [0, 1, 0, 1])
  assert (out.left[3, 0], out.right[3, 0]) == (0, 1)
  out = run(scheme, np.zeros((4, 8), np.int32))
  assert not out.weights.any() and (out.span_id == -1).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_determinism(scheme, batch128, outputs):
  again = run(scheme, batch128, seed=0)
  other = run(scheme, batch128, seed=1)
  for a, b in zip(outputs[scheme, 128], again):
    np.testing.assert_array_equal(a, b)
  assert (outputs[scheme, 128].weights != other.weights).any()
  assert (outputs[scheme, 128].input_ids != other.input_ids).any()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_apply_masking_dispatch(scheme, batch128, outputs):
  cfg = ml_collections.ConfigDict(dict(scheme=scheme, rate=0.15))  # the rest defaults
  apply = jax.jit(functools.partial(masking.apply_masking, cfg=cfg, vocab_size=V))
  for a, b in zip(outputs[scheme, 128], apply(jax.random.key(0), batch128, TABLE)):
    np.testing.assert_array_equal(a, b)


def test_apply_masking_unknown_scheme(batch128):
  with pytest.raises(ValueError, match="whole_word"):
    masking.apply_masking(jax.random.key(0), batch128, TABLE, types.SimpleNamespace(scheme="bpe"),
                          vocab_size=V)


def test_max_predictions():
  assert masking.max_predictions(128, 0.15) == 20
  assert masking.max_predictions(512, 0.15) == 77


# Arbitrary rows, specials anywhere (leading text, [PAD] mid-row, repeated [SEP]).
rows = st.lists(
    st.lists(st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(5, V - 1)), min_size=16, max_size=16),
    min_size=8, max_size=8,
)


@pytest.mark.parametrize("scheme", SCHEMES)
@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(rows=rows, rate=st.sampled_from([0.15, 0.5]), seed=st.integers(0, 2**16))
def test_invariants_on_arbitrary_rows(scheme, rows, rate, seed):
  ids = np.array(rows, np.int32)
  out = run(scheme, ids, seed=seed, rate=rate)
  check_invariants(ids, out, rate, scheme)
  if scheme == "token":
    np.testing.assert_array_equal(out.weights.sum(1), np_budget(ids, rate))
