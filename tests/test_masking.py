"""Tests for spanlm.objectives.masking: invariants of every scheme, checked against NumPy,
and SpanBERT's / ALBERT's selection checked against NumPy re-implementations of their
reference code (facebookresearch/SpanBERT pretraining/fairseq/data/masking.py,
google-research/albert create_pretraining_data.py)."""

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


def scheme_fn(scheme, **kwargs):
  """(rng, ids) -> MaskedBatch: the scheme's function with `kwargs`, everything else its defaults."""
  if scheme == "token":
    fn = functools.partial(masking.mask_tokens, vocab_size=V, **kwargs)
    return lambda rng, ids: fn(rng, ids)
  fn = {"whole_word": masking.mask_whole_words, "ngram": masking.mask_ngrams}.get(scheme, masking.mask_spans)
  fn = functools.partial(fn, vocab_size=V, **kwargs)
  return lambda rng, ids: fn(rng, ids, TABLE)


@functools.cache
def jitted(scheme, **kwargs):
  """One jitted masking function per (scheme, static kwargs); jit caches per shape. Compiling is
  most of this file's time: tests reuse the (256, 128) and (256, 512) programs where they can."""
  return jax.jit(scheme_fn(scheme, **kwargs))


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


def np_budget(ids, rate, scheme="token", cap=0):
  """BERT/ALBERT: min(cap, max(1, round(len(tokens) * rate))), len(tokens) = non-[PAD] tokens;
  SpanBERT: ceil(n * rate) over the n maskable tokens (Python float64, as the references)."""
  n = (~is_special(ids)).sum(1)
  if scheme == "span":
    budget = np.array([math.ceil(k * rate) for k in n])
  else:
    budget = np.array([max(1, int(round(k * rate))) for k in (ids != masking.PAD_ID).sum(1)])
  budget = np.where(n > 0, np.maximum(budget, 1), 0)
  return np.minimum(np.minimum(budget, n), masking.max_predictions(ids.shape[1], rate, cap))


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
  assert (count <= np_budget(ids, rate, scheme)).all()
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
  # Whole words: a masked word is masked entirely (SpanBERT: but for the one word per row
  # where the budget ran out), units start at a word start.
  if scheme != "token":
    word, starts = np_words(ids)
    same_word = (word[:, 1:] == word[:, :-1]) & (word[:, 1:] >= 0)
    cut = (masked[:, 1:] != masked[:, :-1]) & same_word
    assert cut.sum(1).max(initial=0) <= (1 if scheme == "span" else 0)
    first = masked & (out.span_id != np.pad(out.span_id[:, :-1], ((0, 0), (1, 0)), constant_values=-1))
    assert starts[first].all()
  if scheme == "token":
    assert all(first == last for _, _, first, last in spans_of(out.span_id))
  if scheme == "span":  # merged spans: an SBO boundary is never masked
    for b, u, first, last in spans_of(out.span_id):
      assert first == 0 or not masked[b, first - 1]
      assert last == seq_len - 1 or not masked[b, last + 1]
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
@pytest.mark.slow
def test_invariants(scheme, seq_len, outputs, batch128, batch512):
  ids = batch128 if seq_len == 128 else batch512
  check_invariants(ids, outputs[scheme, seq_len], 0.15, scheme)


@pytest.mark.parametrize("seq_len", [128, 512])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.slow
def test_rate(scheme, seq_len, outputs, batch128, batch512):
  ids = batch128 if seq_len == 128 else batch512
  count = outputs[scheme, seq_len].weights.sum(1)
  budget = np_budget(ids, 0.15, scheme)
  n = (~is_special(ids)).sum(1)
  if scheme in ("token", "span"):  # SpanBERT's last span is cut to the budget: always filled
    np.testing.assert_array_equal(count, budget)
    assert abs(count.sum() / n.sum() - 0.15) < 0.01
  else:
    assert (count[budget > 0] / budget[budget > 0]).mean() >= 0.95
    assert count.sum() / n.sum() > 0.95 * 0.15


@pytest.mark.slow
def test_degenerate_rows(outputs):
  for scheme in SCHEMES:
    out = outputs[scheme, 128]
    assert out.weights[0].sum() == 0  # all [PAD]
    np.testing.assert_array_equal(out.weights[2, :3], [0, 1, 0])  # [CLS] x [SEP]
    assert (out.left[2, 1], out.right[2, 1], out.span_id[2, 1]) == (0, 2, 0)


@pytest.mark.slow
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


@pytest.mark.parametrize("scheme", ["token", "whole_word", "ngram"])
@pytest.mark.slow
def test_80_10_10_per_token(scheme, outputs, batch128, batch512):
  parts = [replacement_fractions(ids, outputs[scheme, ids.shape[1]]) for ids in (batch128, batch512)]
  is_mask, is_random, is_same = (np.concatenate(p) for p in zip(*parts))
  assert_binomial(is_mask, 0.8, "[MASK]")
  assert_binomial(is_random, 0.1 * (1 - P_SAME), "random")
  assert_binomial(is_same, 0.1 + 0.1 * P_SAME, "unchanged")


@pytest.mark.slow
def test_ngram_decisions_are_per_token(outputs, batch128, batch512):
  """ALBERT draws 80/10/10 for each token of an n-gram: the first two tokens of a unit are
  both [MASK] with probability 0.8² = 0.64 (a per-n-gram decision would give 0.8)."""
  both = []
  for ids in (batch128, batch512):
    out = outputs["ngram", ids.shape[1]]
    for b, u, first, last in spans_of(out.span_id):
      if last > first:
        both.append((out.input_ids[b, first : first + 2] == masking.MASK_ID).all())
  assert_binomial(np.array(both), 0.64, "both [MASK]")


@pytest.mark.slow
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
  probs = masking.span_length_probs(0.2, 10)
  lengths = np.arange(1, 11)
  np.testing.assert_allclose(probs, 0.2 * 0.8 ** (lengths - 1) / (1 - 0.8**10))
  assert abs(probs @ lengths - PAPER_MEAN_SPAN) < 0.01


def spanbert_reference(block, is_start, rng, ratio=0.15, p=0.2, lower=1, upper=10):
  """SpanBERT's `PairWithSpanMaskingScheme.mask` + `merge_intervals` on one block (the
  row's text, no [CLS]/[SEP]), re-implemented in NumPy from facebookresearch/SpanBERT
  pretraining/fairseq/data/masking.py. Returns the merged spans [(start, end)]."""
  n = len(block)
  lens = np.arange(lower, upper + 1)
  dist = p * (1 - p) ** (lens - lower)
  dist = dist / dist.sum()

  def word_start(a):
    while a > 0 and not is_start[a]:
      a -= 1
    return a

  def word_end(a):  # exclusive: the next word's start
    r = a + 1
    while r < n and not is_start[r]:
      r += 1
    return r

  mask_num = math.ceil(n * ratio)
  mask, spans = set(), []
  while len(mask) < mask_num:
    span_len = rng.choice(lens, p=dist)
    anchor = rng.choice(n)
    if anchor in mask:
      continue
    left1, right1 = word_start(anchor), word_end(anchor)
    spans.append([left1, left1])
    for i in range(left1, right1):
      if len(mask) >= mask_num:
        break
      mask.add(i)
      spans[-1][-1] = i
    num_words, right2 = 1, right1
    while num_words < span_len and right2 < n and len(mask) < mask_num:
      left2, right2 = right2, word_end(right2)
      num_words += 1
      for i in range(left2, right2):
        if len(mask) >= mask_num:
          break
        mask.add(i)
        spans[-1][-1] = i
  merged = []
  for interval in sorted(spans, key=lambda x: x[0]):
    if not merged or merged[-1][1] + 1 < interval[0]:
      merged.append(list(interval))
    else:
      merged[-1][1] = max(merged[-1][1], interval[1])
  assert len(mask) == sum(e - s + 1 for s, e in merged)
  return merged


def words_touched(is_start, first, last):
  return int(is_start[first : last + 1].sum() + (0 if is_start[first] else 1))


@pytest.fixture(scope="module")
def long_rows():
  """256 single-segment rows of 400-509 text tokens whose words are mostly one piece (as most
  SentencePiece words are: 1, 2, 3 pieces w.p. 0.7, 0.2, 0.1), and spanlm's masking of them
  (the shape of batch512: its compiled program is reused; ceil(509 * 0.15) = 77 fits the cap)."""
  rng = np.random.default_rng(5)
  ids = np.zeros((256, 512), np.int32)
  for b in range(len(ids)):
    n = rng.integers(400, 510)
    toks = []
    while len(toks) < n:
      toks += [rng.integers(5, 500)] + list(rng.integers(500, V, rng.choice(3, p=[0.7, 0.2, 0.1])))
    ids[b, : n + 2] = [masking.CLS_ID, *toks[:n], masking.SEP_ID]
  return ids, run("span", ids, seed=7)


@pytest.mark.slow
def test_span_lengths_match_spanbert_reference(long_rows):
  """The realised (merged) span lengths in words: within 5% in mean and 0.05 in total
  variation of SpanBERT's own selection algorithm run on the same rows."""
  ids, out = long_rows
  rng = np.random.default_rng(0)
  ours, ref = [], []
  for b in range(len(ids)):
    text = np.nonzero(~is_special(ids[b]))[0]
    block = ids[b, text]
    starts = TABLE[block].copy()
    starts[0] = True
    ref += [words_touched(starts, s, e) for s, e in spanbert_reference(block, starts, rng)]
    m = out.weights[b, text] > 0
    edges = np.diff(np.concatenate([[0], m.astype(int), [0]]))
    ours += [words_touched(starts, s, e - 1) for s, e in zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0])]
  ours, ref = np.array(ours), np.array(ref)
  assert len(ours) > 3000 and len(ref) > 3000
  assert abs(ours.mean() / ref.mean() - 1) < 0.05, (ours.mean(), ref.mean())
  top = max(ours.max(), ref.max()) + 1
  tv = 0.5 * np.abs(np.bincount(ours, minlength=top) / len(ours) - np.bincount(ref, minlength=top) / len(ref)).sum()
  assert tv < 0.05, tv


@pytest.mark.slow
def test_span_replacements_come_from_the_token_stream(long_rows):
  """SpanBERT's random replacements are np.random.choice(tokens) over the corpus stream:
  here the batch's text tokens. Word-start ids (5..499) are ~1/2.5 of the text but
  half of the vocabulary's ids; the two laws differ."""
  ids, out = long_rows
  masked = out.weights > 0
  replaced = masked & (out.input_ids != ids) & (out.input_ids != masking.MASK_ID)
  new = out.input_ids[replaced]
  text = ids[ids >= masking.NUM_RESERVED]
  assert len(new) > 500
  assert_binomial(new < 500, (text < 500).mean(), "word-start replacements")
  assert abs((text < 500).mean() - 0.5) > 0.05  # distinguishable from uniform over [5, V)


@pytest.mark.slow
def test_sbo_boundaries_are_never_masked(long_rows):
  ids, out = long_rows
  masked = out.weights > 0
  rows = np.nonzero(masked)[0]
  assert not masked[rows, out.left[masked]].any() and not masked[rows, out.right[masked]].any()


def test_sbo_targets_as_spanbert():
  """No SBO target for a span touching the block's edges; at most `max_targets` per span."""
  row = [masking.CLS_ID] + list(range(10, 40)) + [masking.SEP_ID]  # 30 one-piece words
  ids = np.array([row], np.int32)
  unit = np.full(ids.shape, -1)
  unit[0, 1:3] = 0  # touches [CLS]: no target
  unit[0, 5:25] = 1  # 20 tokens inside: targets on its first 4 here (max_targets=4)
  unit[0, 29:31] = 2  # touches [SEP]: no target
  m = masking._corrupt(jax.random.key(0), ids, unit, per_unit=True, vocab_size=V, mask_prob=0.8,
                       random_prob=0.1, mask_id=masking.MASK_ID, num_reserved=masking.NUM_RESERVED)
  w = np.asarray(masking.sbo_weights(m, ids, max_targets=4))
  np.testing.assert_array_equal(np.nonzero(w[0])[0], [5, 6, 7, 8])


def test_ngram_cap_is_albert_max_predictions_per_seq(batch512):
  out = run("ngram", batch512, cap=20)
  count = out.weights.sum(1)
  assert count.max() == 20 and masking.max_predictions(512, 0.15, 20) == 20
  np.testing.assert_array_less(count, np_budget(batch512, 0.15, "ngram", cap=20) + 1)


def test_replacement_laws():
  """'uniform': any non-reserved id; 'unigram': the batch's own tokens, in proportion."""
  ids = np.full((64, 64), 7, np.int32)
  ids[:, 0], ids[:, -1] = masking.CLS_ID, masking.SEP_ID
  ids[:, 1:16] = 900  # a quarter of the text (15 of 62 tokens) is 900, the rest 7
  for law, want_7, want_900 in (("unigram", 47 / 62, 15 / 62), ("uniform", P_SAME, P_SAME)):
    out = run("token", ids, seed=3, rate=0.5, mask_prob=0.0, random_prob=1.0, replacement=law)
    new = out.input_ids[out.weights > 0]
    assert_binomial(new == 7, want_7, f"{law}: 7")
    assert_binomial(new == 900, want_900, f"{law}: 900")

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
        # Budget 4: both words; touching spans are merged into one (SpanBERT's merge_intervals).
        ("span", ROW, 1.0, [((1, 4, 0, 5),)], []),
        # Spans stop at [SEP], which may be a boundary.
        ("span", PAIR, 1.0, [((1, 2, 0, 3), (4, 5, 3, 6))], []),
        # ALBERT keeps touching n-grams apart (it rejects overlaps, never merges).
        # (Starting at the second word first, an n-gram from the first overlaps it and is
        # skipped, and each start word is tried once: then the row stays under budget.)
        ("ngram", ROW, 1.0, [((1, 4, 0, 5),), ((1, 2, 0, 3), (3, 4, 2, 5))], [((3, 4, 2, 5),)]),
        # Budget max(1, round(0.15 * 6)) = 1: one token, boundaries its neighbours.
        ("token", ROW, 0.15, [((i, i, i - 1, i + 1),) for i in range(1, 5)], []),
    ],
)
@pytest.mark.slow
def test_handmade_boundaries(scheme, row, rate, expected, possible):
  # 8 rows of 16, the shape of test_invariants_on_arbitrary_rows (the same rate shares its compiled
  # program), 8 seeds: 64 draws, every row drawing its own randomness.
  ids = np.array([row + [masking.PAD_ID] * 8] * 8, np.int32)
  seen = []
  for seed in range(8):
    out = run(scheme, ids, seed=seed, rate=rate)
    check_invariants(ids, out, rate, scheme)
    seen += configurations(out)
    if scheme == "span" and rate == 1.0:  # the 4-token budget is always reached
      assert (out.weights.sum(1) == 4).all()
  assert set(seen) <= set(expected + possible)
  assert set(expected) <= set(seen)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_degenerate_batch(scheme):
  # batch128's shape: `outputs` and this test share one compiled program per scheme.
  ids = np.zeros((256, 128), np.int32)
  ids[1, :3] = [masking.CLS_ID, 9, masking.SEP_ID]
  ids[2, :2] = [masking.CLS_ID, masking.SEP_ID]
  ids[3, :1] = [9]  # no [CLS]: boundaries are clamped into the row
  out = run(scheme, ids)
  check_invariants(ids, out, 0.15, scheme)
  np.testing.assert_array_equal(out.weights.sum(1)[:4], [0, 1, 0, 1])
  assert not out.weights[4:].any()
  assert (out.left[3, 0], out.right[3, 0]) == (0, 1)
  out = run(scheme, np.zeros((256, 128), np.int32))  # nothing maskable anywhere in the batch
  assert not out.weights.any() and (out.span_id == -1).all()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.slow
def test_determinism(scheme, batch128, outputs):
  again = run(scheme, batch128, seed=0)
  other = run(scheme, batch128, seed=1)
  for a, b in zip(outputs[scheme, 128], again):
    np.testing.assert_array_equal(a, b)
  assert (outputs[scheme, 128].weights != other.weights).any()
  assert (outputs[scheme, 128].input_ids != other.input_ids).any()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_apply_masking_dispatch(scheme, batch128):
  """apply_masking(cfg with only scheme and rate) is the scheme's function with its defaults: the
  same traced program (equations and constants), hence the same masks as `outputs` (compared by
  tracing, not by compiling apply_masking again)."""
  cfg = ml_collections.ConfigDict(dict(scheme=scheme, rate=0.15))  # the rest defaults
  ids = batch128[:16]
  got = jax.make_jaxpr(lambda rng, x: masking.apply_masking(rng, x, TABLE, cfg, vocab_size=V))(jax.random.key(0), ids)
  want = jax.make_jaxpr(scheme_fn(scheme))(jax.random.key(0), ids)
  assert str(got.jaxpr) == str(want.jaxpr), "apply_masking traced another program than the scheme's defaults"
  assert len(got.consts) == len(want.consts)
  for a, b in zip(got.consts, want.consts):
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
@pytest.mark.slow
def test_invariants_on_arbitrary_rows(scheme, rows, rate, seed):
  ids = np.array(rows, np.int32)
  out = run(scheme, ids, seed=seed, rate=rate)
  check_invariants(ids, out, rate, scheme)
  if scheme == "token":
    np.testing.assert_array_equal(out.weights.sum(1), np_budget(ids, rate, scheme))


def test_mlm_smoothing_prefers_rare_tokens():
  """DistilBERT's mlm_smoothing: tokens chosen with p ∝ max(count, 1)^-0.7, without replacement
  (torch.multinomial), against a NumPy draw of the same law on the same rows."""
  rng = np.random.default_rng(0)
  ids = np.full((32, 64), 7, np.int32)
  ids[:, 0], ids[:, -1] = masking.CLS_ID, masking.SEP_ID
  ids[:, 1:25] = rng.integers(10, V, (32, 24))  # 24 mostly rare tokens, 38 copies of 7 per row
  out = run("token", ids, seed=1, smoothing=0.7)
  got = (ids[out.weights > 0] == 7).mean()
  text = ~is_special(ids)
  counts = np.bincount(ids[text], minlength=V)
  picks = []
  for b in range(len(ids)):
    pos = np.nonzero(text[b])[0]
    w = np.maximum(counts[ids[b, pos]], 1) ** -0.7
    for _ in range(20):
      chosen = rng.choice(pos, size=np_budget(ids[b:b + 1], 0.15)[0], replace=False, p=w / w.sum())
      picks.append((ids[b, chosen] == 7).mean())
  want = np.mean(picks)
  assert want < 0.3 < (ids[text] == 7).mean()  # the law differs from uniform selection
  assert abs(got - want) < 0.03, (got, want)
