"""Input corruption for masked-language-model pretraining.

Four schemes share one output contract (`MaskedBatch`); each follows its
reference implementation (docs/fidelity.md lists every choice and its switch):

* `mask_tokens`: BERT's i.i.d. token masking (Devlin et al., 2019, §3.1).
* `mask_whole_words`: BERT's whole-word masking (google-research/bert,
  `create_pretraining_data.py --do_whole_word_mask`).
* `mask_spans`: SpanBERT's geometric span masking (Joshi et al., 2020, §3.1),
  whose span boundaries feed the span-boundary objective (SBO, §3.2).
* `mask_ngrams`: ALBERT's n-gram masking (Lan et al., 2020, §4.1), n-grams of
  up to 3 whole words with p(n) ∝ 1/n.
  Spans and n-grams are one implementation, `mask_word_spans`, given a length
  law and the reference's selection rules.

Everything is pure JAX with static shapes so that masking runs on device inside
the jitted train step: each step draws fresh masks from the step's rng (dynamic
masking, Liu et al., 2019) and the host pipeline only ships token ids. All
functions take `[B, L]` int32 ids; `vocab_size`, rates and lengths are static
Python values.

Token-id conventions follow `spanlm.data.tokenizer`: ids below `NUM_RESERVED`
are reserved, `[CLS]`, `[SEP]` and `[PAD]` are never masked (`[UNK]` is an
ordinary token), and random replacements are never special: uniform over
`[NUM_RESERVED, vocab_size)` or drawn from the batch's text tokens.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PAD_ID = 0
UNK_ID = 1
CLS_ID = 2
SEP_ID = 3
MASK_ID = 4
NUM_RESERVED = 5

SCHEMES = ("token", "whole_word", "span", "ngram")
REPLACEMENTS = ("uniform", "unigram")


class MaskedBatch(NamedTuple):
  """Corrupted inputs and prediction targets; all fields are `[B, L]`.

  A *masked unit* is what one selection step masks: a token (`mask_tokens`),
  a word (`mask_whole_words`) or a span of whole words (`mask_spans`). Units
  are contiguous and never overlap.

  Attributes:
    input_ids: int32 corrupted ids fed to the model.
    targets: int32 original ids (equal to the input batch everywhere).
    weights: float32, 1.0 at positions to predict, else 0.
    left: int32 position `s - 1` just left of the unit `[s, e]` containing the
      token, i.e. the left boundary token x_{s-1} of SpanBERT's SBO; 0 where
      `weights == 0`.
    right: int32 position `e + 1`, the right boundary x_{e+1}; 0 where
      `weights == 0`. Both boundaries are clamped to `[0, L - 1]`, which only
      matters for rows not framed by `[CLS]` ... `[SEP]`.
    span_id: int32 index of the unit within its row, numbered 0, 1, ... from
      left to right; -1 where not masked.
  """

  input_ids: jax.Array
  targets: jax.Array
  weights: jax.Array
  left: jax.Array
  right: jax.Array
  span_id: jax.Array


def max_predictions(seq_len: int, rate: float, cap: int = 0) -> int:
  """Static upper bound on the number of masked tokens in a row of `seq_len`.

  Use it to size fixed-shape buffers (e.g. gathered MLM positions): no row is
  ever given more than this many masked tokens. `cap` > 0 is a recipe's
  `max_predictions_per_seq` (ALBERT: 20), config.masking.max_predictions.
  """
  bound = math.ceil(rate * seq_len)
  return min(bound, int(cap)) if cap and cap > 0 else bound


def special_mask(
    input_ids: jax.Array,
    *,
    special_ids: tuple[int, ...] = (PAD_ID, CLS_ID, SEP_ID),
) -> jax.Array:
  """Bool `[B, L]`: True at tokens that are never masked ([CLS]/[SEP]/[PAD])."""
  return jnp.isin(jnp.asarray(input_ids, jnp.int32), jnp.asarray(special_ids, jnp.int32))


def word_starts(
    input_ids: jax.Array,
    word_start_table: jax.Array,
    *,
    special_ids: tuple[int, ...] = (PAD_ID, CLS_ID, SEP_ID),
) -> jax.Array:
  """Bool `[B, L]`: True at maskable tokens that begin a word.

  A token begins a word if its SentencePiece piece starts with '▁'
  (`word_start_table[id]`) or if it follows a special token (or the row start),
  so that every word is a maximal run "word start, continuations..." that never
  crosses a special token.

  Args:
    input_ids: int `[B, L]` token ids.
    word_start_table: bool `[vocab_size]`.
    special_ids: ids of tokens that are never masked.
  """
  special = special_mask(input_ids, special_ids=special_ids)
  prev_special = jnp.pad(special[:, :-1], ((0, 0), (1, 0)), constant_values=True)
  return ~special & (jnp.asarray(word_start_table)[input_ids] | prev_special)


def mask_tokens(
    rng: jax.Array,
    input_ids: jax.Array,
    *,
    vocab_size: int,
    rate: float = 0.15,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
    mask_id: int = MASK_ID,
    num_reserved: int = NUM_RESERVED,
    replacement: str = "uniform",
    cap: int = 0,
    smoothing: float = 0.0,
) -> MaskedBatch:
  """BERT token masking (Devlin et al., 2019, §3.1; google-research/bert
  `create_masked_lm_predictions`).

  `smoothing` > 0 is DistilBERT's `mlm_smoothing` (0.7 in its recipe): a token
  is chosen with probability ∝ max(count, 1)^-smoothing, so rare tokens are
  masked more often (weighted sampling without replacement, by Gumbel top-k).
  Counts are the token's occurrences in the batch (DistilBERT: in the corpus).

  Exactly `budget` of each row's maskable tokens (`_budget`: BERT's
  `min(max_predictions_per_seq, max(1, round(len(tokens) * rate)))`) are chosen
  uniformly without replacement, and each is independently replaced by [MASK]
  (`mask_prob`), a random token (`random_prob`) or kept. The 10% random / 10%
  kept tokens reduce the mismatch between pretraining inputs, which contain
  [MASK], and fine-tuning inputs, which do not.
  """
  select_rng, corrupt_rng = jax.random.split(rng)
  maskable = ~special_mask(input_ids)
  budget = _budget(input_ids, rate, cap=cap)
  if smoothing > 0:
    counts = jnp.zeros(vocab_size, jnp.float32).at[input_ids].add(maskable.astype(jnp.float32))
    log_w = -smoothing * jnp.log(jnp.maximum(counts[input_ids], 1.0))
    scores = -(log_w + jax.random.gumbel(select_rng, input_ids.shape))
    scores = jnp.where(maskable, scores, jnp.inf)
  else:
    scores = jnp.where(maskable, jax.random.uniform(select_rng, input_ids.shape), jnp.inf)
  rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
  unit = jnp.where(rank < budget[:, None], positions, -1)
  return _corrupt(
      corrupt_rng, input_ids, unit, per_unit=False, vocab_size=vocab_size,
      mask_prob=mask_prob, random_prob=random_prob, mask_id=mask_id,
      num_reserved=num_reserved, replacement=replacement,
  )


def mask_whole_words(
    rng: jax.Array,
    input_ids: jax.Array,
    word_start_table: jax.Array,
    *,
    vocab_size: int,
    rate: float = 0.15,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
    mask_id: int = MASK_ID,
    num_reserved: int = NUM_RESERVED,
    replacement: str = "uniform",
    cap: int = 0,
) -> MaskedBatch:
  """Whole-word masking, as BERT's `create_pretraining_data.py --do_whole_word_mask`.

  Words are visited in a uniformly random order and each is masked whole if it
  fits in the row's remaining budget, else skipped, so a row may end slightly
  under budget. Masking whole words stops the model from predicting a word
  piece from its sibling pieces, which is too easy. As in BERT, the 80/10/10
  decision is drawn per token, not per word.
  """
  select_rng, corrupt_rng = jax.random.split(rng)
  maskable = ~special_mask(input_ids)
  word = jnp.cumsum(word_starts(input_ids, word_start_table), axis=1) - 1
  word = jnp.maximum(word, 0)  # -1 only before the first word: never maskable.
  budget = _budget(input_ids, rate, cap=cap)
  rngs = jax.random.split(select_rng, input_ids.shape[0])
  taken = jax.vmap(_greedy_words)(rngs, word, maskable, budget)
  unit = jnp.where(maskable & jnp.take_along_axis(taken, word, axis=1), word, -1)
  return _corrupt(
      corrupt_rng, input_ids, unit, per_unit=False, vocab_size=vocab_size,
      mask_prob=mask_prob, random_prob=random_prob, mask_id=mask_id,
      num_reserved=num_reserved, replacement=replacement,
  )


def mask_spans(
    rng: jax.Array,
    input_ids: jax.Array,
    word_start_table: jax.Array,
    *,
    vocab_size: int,
    rate: float = 0.15,
    geometric_p: float = 0.2,
    max_span: int = 10,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
    mask_id: int = MASK_ID,
    num_reserved: int = NUM_RESERVED,
    replacement: str = "unigram",
    cap: int = 0,
) -> MaskedBatch:
  """SpanBERT span masking (Joshi et al., 2020, §3.1), as SpanBERT's code does it.

  `mask_word_spans` with the length law ℓ ~ Geo(`geometric_p`) truncated to
  [1, `max_span`] words (mean 3.8 words for the paper's p=0.2, max 10) and
  SpanBERT's selection (`PairWithSpanMaskingScheme.mask`, `span_masking` and
  `merge_intervals` in facebookresearch/SpanBERT pretraining/fairseq/data/masking.py):
  anchors are tokens, spans may overlap or touch and are merged, the budget is
  `ceil(rate * n)` and the last span is cut where the budget runs out. One
  80/10/10 decision per merged span (`--replacement-method span`); random
  replacements come from the token stream (`replacement='unigram'`).
  """
  return mask_word_spans(
      rng, input_ids, word_start_table, length_probs=span_length_probs(geometric_p, max_span),
      selection="spanbert", vocab_size=vocab_size, rate=rate, mask_prob=mask_prob,
      random_prob=random_prob, mask_id=mask_id, num_reserved=num_reserved,
      replacement=replacement, cap=cap)


def mask_ngrams(
    rng: jax.Array,
    input_ids: jax.Array,
    word_start_table: jax.Array,
    *,
    vocab_size: int,
    rate: float = 0.15,
    max_ngram: int = 3,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
    mask_id: int = MASK_ID,
    num_reserved: int = NUM_RESERVED,
    replacement: str = "uniform",
    cap: int = 0,
) -> MaskedBatch:
  """ALBERT n-gram masking (Lan et al., 2020, §4.1): p(n) = (1/n) / Σ_{k=1}^{N} 1/k.

  `mask_word_spans` with this length law (N = `max_ngram` = 3: n = 1, 2, 3
  whole words with probabilities 6/11, 3/11, 2/11, mean 1.64 words) and ALBERT's
  selection (google-research/albert `create_masked_lm_predictions`): start
  words visited in random order without replacement, an n-gram overlapping a
  masked token is skipped, one over budget is shortened to the most words that
  fit, and the 80/10/10 decision is drawn per token. The budget is BERT's
  (`cap` = ALBERT's `max_predictions_per_seq`, 20 in its recipe).
  """
  return mask_word_spans(
      rng, input_ids, word_start_table, length_probs=ngram_length_probs(max_ngram),
      selection="albert", vocab_size=vocab_size, rate=rate, mask_prob=mask_prob,
      random_prob=random_prob, mask_id=mask_id, num_reserved=num_reserved,
      replacement=replacement, cap=cap)


SELECTIONS = ("spanbert", "albert")


def mask_word_spans(
    rng: jax.Array,
    input_ids: jax.Array,
    word_start_table: jax.Array,
    *,
    length_probs: np.ndarray,
    selection: str,
    vocab_size: int,
    rate: float = 0.15,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
    mask_id: int = MASK_ID,
    num_reserved: int = NUM_RESERVED,
    replacement: str = "uniform",
    cap: int = 0,
) -> MaskedBatch:
  """Masks runs of whole words whose length in words follows `length_probs`.

  `length_probs[k]` is p(ℓ = k + 1 words): the length law is the only thing
  that differs between SpanBERT's spans and ALBERT's n-grams besides the
  reference's selection rules, `selection`:

  'spanbert'  candidates (ℓ, anchor) with the anchor a uniformly random
              maskable TOKEN; an anchor already masked is skipped. The span is
              the anchor's word and the ℓ-1 words after it (never past the end
              of the text segment); its unmasked tokens are masked in order
              until the budget `ceil(rate * n)` is spent (so the last span may
              stop inside a word). Spans may overlap or touch; the masked
              tokens' maximal runs are the merged spans, each one unit with
              one 80/10/10 decision (SBO boundaries are therefore never masked).
  'albert'    candidates (ℓ, start word) with start words in a uniformly random
              order without replacement; ℓ is shortened to the most words that
              fit the remaining budget (skipped if none); an n-gram overlapping
              masked tokens is skipped; 80/10/10 per token.

  Selection is a `lax.scan` over K static candidates per row (`_num_candidates`),
  O(K·L) work with static shapes; a row that has not spent its budget after K
  candidates stays under budget (measured: never at L=128 and 512 on text).
  """
  if selection not in SELECTIONS:
    raise ValueError(f"selection={selection!r}; choose one of {SELECTIONS}")
  select_rng, corrupt_rng = jax.random.split(rng)
  batch, seq_len = input_ids.shape
  maskable = ~special_mask(input_ids)
  spanbert = selection == "spanbert"
  budget = _budget(input_ids, rate, rounding="ceil" if spanbert else "bert", cap=cap)
  sample = functools.partial(
      _sample_word_spans, log_probs=jnp.log(jnp.asarray(length_probs, jnp.float32)),
      num_candidates=_num_candidates(seq_len, rate, cap), merge=spanbert)
  unit = jax.vmap(sample)(jax.random.split(select_rng, batch), maskable,
                          word_starts(input_ids, word_start_table), budget)
  return _corrupt(
      corrupt_rng, input_ids, unit, per_unit=spanbert, vocab_size=vocab_size,
      mask_prob=mask_prob, random_prob=random_prob, mask_id=mask_id,
      num_reserved=num_reserved, replacement=replacement,
  )


def span_length_probs(geometric_p: float, max_span: int) -> np.ndarray:
  """SpanBERT's p(ℓ) ∝ p(1-p)^(ℓ-1) for ℓ = 1..max_span, renormalised (a static array)."""
  probs = geometric_p * (1 - geometric_p) ** np.arange(max_span)
  return probs / probs.sum()


def ngram_length_probs(max_ngram: int) -> np.ndarray:
  """ALBERT's p(n) ∝ 1/n for n = 1..max_ngram (a static array)."""
  inv = 1.0 / np.arange(1, max_ngram + 1)
  return inv / inv.sum()


def sbo_weights(masked: MaskedBatch, input_ids: jax.Array, max_targets: int = 15) -> jax.Array:
  """float32 [B, L]: 1 at the tokens SpanBERT's SBO predicts, else 0.

  As SpanBERT's `span_masking` (endpoints='external') with `pad_to_len`: a
  (merged) span gets SBO targets only if both boundary tokens x_{s-1}, x_{e+1}
  are text of the row (no target for a span touching [CLS], [SEP] or the row's
  ends), and only its first `max_targets` tokens (`--max-pair-targets 15`).
  """
  seq_len = input_ids.shape[1]
  maskable = ~special_mask(input_ids)
  pos = jnp.arange(seq_len)[None, :]
  m = masked.weights > 0
  inside = (jnp.take_along_axis(maskable, masked.left, 1) & (masked.left < pos)
            & jnp.take_along_axis(maskable, masked.right, 1) & (masked.right > pos))
  return (m & inside & (pos - masked.left - 1 < max_targets)).astype(jnp.float32)


def apply_masking(
    rng: jax.Array,
    input_ids: jax.Array,
    word_start_table: jax.Array,
    cfg: Any,
    *,
    vocab_size: int,
) -> MaskedBatch:
  """Dispatches on `cfg.scheme` in `SCHEMES`.

  Reads `cfg.rate`, `cfg.mask_prob`, `cfg.random_prob`, `cfg.replacement`,
  `cfg.max_predictions`, for tokens `cfg.smoothing` and, for spans, `cfg.geometric_p` and `cfg.max_span`
  (n-grams: `cfg.max_ngram`), falling back to the scheme functions' defaults
  for any that `cfg` lacks (`replacement`: the scheme's paper's).
  """
  get = lambda k, d: cfg[k] if (k in cfg if hasattr(cfg, "keys") else hasattr(cfg, k)) else d
  common = dict(vocab_size=vocab_size, rate=get("rate", 0.15), mask_prob=get("mask_prob", 0.8),
                random_prob=get("random_prob", 0.1), cap=int(get("max_predictions", 0) or 0))
  replacement = get("replacement", "")
  if replacement:
    common["replacement"] = replacement
  if cfg.scheme == "token":
    return mask_tokens(rng, input_ids, smoothing=float(get("smoothing", 0.0) or 0.0), **common)
  if cfg.scheme == "whole_word":
    return mask_whole_words(rng, input_ids, word_start_table, **common)
  if cfg.scheme == "span":
    return mask_spans(rng, input_ids, word_start_table, geometric_p=get("geometric_p", 0.2),
                      max_span=get("max_span", 10), **common)
  if cfg.scheme == "ngram":
    return mask_ngrams(rng, input_ids, word_start_table, max_ngram=get("max_ngram", 3), **common)
  raise ValueError(f"Unknown masking scheme {cfg.scheme!r}; expected one of {SCHEMES}.")


def _budget(input_ids: jax.Array, rate: float, *, rounding: str = "bert", cap: int = 0) -> jax.Array:
  """Per-row number of tokens to mask, int32 `[B]`, exactly as the reference computes it.

  'bert' (BERT, ALBERT): `min(cap, max(1, round(len(tokens) * rate)))` with
  len(tokens) counting [CLS]/[SEP] (every non-[PAD] token) and Python's
  round-half-even; 'ceil' (SpanBERT): `ceil(n * rate)` over the n maskable
  tokens. Both through a static table indexed by the count, so the value is
  Python's float64 arithmetic, not float32's. Never more than the n maskable
  tokens, nor `max_predictions(L, rate, cap)`; 0 for a row with nothing maskable.
  """
  seq_len = input_ids.shape[1]
  maskable = ~special_mask(input_ids)
  n = maskable.sum(axis=1, dtype=jnp.int32)
  if rounding == "ceil":
    table = np.array([math.ceil(k * rate) for k in range(seq_len + 1)], np.int32)
    budget = jnp.asarray(table)[n]
  elif rounding == "bert":
    table = np.array([max(1, int(round(k * rate))) for k in range(seq_len + 1)], np.int32)
    budget = jnp.asarray(table)[jnp.sum(input_ids != PAD_ID, axis=1)]
  else:
    raise ValueError(f"rounding={rounding!r}; choose 'bert' or 'ceil'")
  budget = jnp.where(n > 0, jnp.maximum(budget, 1), 0)
  return jnp.minimum(budget, jnp.minimum(n, max_predictions(seq_len, rate, cap)))


def _greedy_words(
    rng: jax.Array, word: jax.Array, maskable: jax.Array, budget: jax.Array
) -> jax.Array:
  """One row: bool `[L]` over word indices, True for words masked whole.

  Visits word slots in random order and takes each word that fits in the
  remaining budget (slots past the row's last word have length 0).
  """
  seq_len = word.shape[0]
  length = jnp.zeros(seq_len, jnp.int32).at[word].add(maskable.astype(jnp.int32))
  order = jax.random.permutation(rng, seq_len)

  def step(count, n):
    fits = count + n <= budget
    return count + jnp.where(fits, n, 0), fits

  _, fits = lax.scan(step, jnp.int32(0), length[order])
  return jnp.zeros(seq_len, bool).at[order].set(fits)


def _num_candidates(seq_len: int, rate: float, cap: int = 0) -> int:
  """Static number K of span candidates per row: twice the largest budget.

  Needed: about budget / (mean span tokens) accepted candidates, plus skipped
  ones (masked anchors for SpanBERT, overlaps for ALBERT) and, at the end, those
  that no longer fit. 2× the token budget fills the budget of every row of the
  bundled sample at L=128 and 512 (tests/test_masking.py checks fill rates).
  """
  return max(2 * max_predictions(seq_len, rate, cap), 1)


def _sample_word_spans(
    rng: jax.Array,
    maskable: jax.Array,
    starts: jax.Array,
    budget: jax.Array,
    *,
    log_probs: jax.Array,
    num_candidates: int,
    merge: bool,
) -> jax.Array:
  """One row of `mask_word_spans` selection: int32 `[L]`, a unit key per masked token or -1.

  merge=True is SpanBERT's rule set, merge=False ALBERT's (see `mask_word_spans`).
  """
  seq_len = maskable.shape[0]
  pos = jnp.arange(seq_len)
  next_maskable = jnp.append(maskable[1:], False)
  next_start = jnp.append(starts[1:], True)
  ends = maskable & (~next_maskable | next_start)
  # Last token of the text segment (run of maskable tokens) at each position.
  segment_end = lax.cummin(jnp.where(ends & ~next_maskable, pos, seq_len), reverse=True)
  word_of = jnp.cumsum(starts) - 1  # word index of each maskable token
  n_words = starts.sum(dtype=jnp.int32)
  n_tokens = maskable.sum(dtype=jnp.int32)
  start_pos = jnp.nonzero(starts, size=seq_len)[0]
  end_pos = jnp.nonzero(ends, size=seq_len)[0]
  token_pos = jnp.nonzero(maskable, size=seq_len)[0]

  len_rng, start_rng = jax.random.split(rng)
  # Span lengths by inverse CDF: one uniform per candidate. The same law as jax.random.categorical,
  # whose [K, max_span] Gumbel draw took XLA:CPU ~2 s more to compile (most of this function's).
  cdf = jnp.cumsum(jax.nn.softmax(log_probs))
  u = jax.random.uniform(len_rng, (num_candidates,))
  n_span_words = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), log_probs.shape[0] - 1) + 1
  if merge:  # SpanBERT: anchor = a uniformly random maskable token (with replacement)
    anchors = token_pos[jax.random.randint(start_rng, (num_candidates,), 0, jnp.maximum(n_tokens, 1))]
    first_word = word_of[anchors]
  else:  # ALBERT: start words in a random order, each once (valid word slots first)
    slot = jnp.arange(seq_len)
    noise = jnp.where(slot < n_words, jax.random.uniform(start_rng, (seq_len,)), 2.0)
    order = jnp.argsort(noise)
    first_word = jnp.concatenate([order, jnp.full(max(num_candidates - seq_len, 0), seq_len)])
    first_word = first_word[:num_candidates]
    anchors = start_pos[jnp.minimum(first_word, seq_len - 1)]

  def step(carry, candidate):
    unit, count = carry
    k, n, w, anchor = candidate
    valid = (w < n_words) & (n_tokens > 0)
    w = jnp.minimum(w, jnp.maximum(n_words - 1, 0))
    s = start_pos[w]
    e = jnp.minimum(end_pos[jnp.minimum(w + n, n_words) - 1], segment_end[s])
    span = (pos >= s) & (pos <= e)
    if merge:
      new = span & (unit < 0)
      take = new & (jnp.cumsum(new) <= budget - count) & valid & (unit[anchor] < 0)
    else:
      e = jnp.minimum(e, s + budget - count - 1)  # shorten to the last word end that fits
      e = jnp.max(jnp.where(ends & (pos >= s) & (pos <= e), pos, -1))
      span = (pos >= s) & (pos <= e)
      overlaps = jnp.any((unit >= 0) & span)
      take = span & valid & ~overlaps & (e >= s)
    return (jnp.where(take, k, unit), count + take.sum(dtype=jnp.int32)), None

  init = (jnp.full(seq_len, -1, jnp.int32), jnp.int32(0))
  candidates = (jnp.arange(num_candidates, dtype=jnp.int32), n_span_words,
                first_word.astype(jnp.int32), anchors.astype(jnp.int32))
  (unit, _), _ = lax.scan(step, init, candidates)
  if merge:  # the merged spans: maximal runs of masked tokens (merge_intervals)
    masked = unit >= 0
    run_start = masked & ~jnp.append(False, masked[:-1])
    unit = jnp.where(masked, jnp.cumsum(run_start) - 1, -1).astype(jnp.int32)
  return unit


def _corrupt(
    rng: jax.Array,
    input_ids: jax.Array,
    unit: jax.Array,
    *,
    per_unit: bool,
    vocab_size: int,
    mask_prob: float,
    random_prob: float,
    mask_id: int,
    num_reserved: int,
    replacement: str = "uniform",
) -> MaskedBatch:
  """Builds the `MaskedBatch` from a selection.

  Args:
    rng: key for the 80/10/10 decisions and the random replacement ids.
    input_ids: int `[B, L]` original ids.
    unit: int `[B, L]`, -1 at unmasked positions, elsewhere a key that is
      constant over each masked unit's contiguous positions and differs between
      adjacent units.
    per_unit: one [MASK]/random/keep decision per unit (SpanBERT) rather than
      per token (BERT).
    vocab_size, mask_prob, random_prob, mask_id, num_reserved: as in the
      public functions.
    replacement: where random replacements come from (`REPLACEMENTS`):
      'uniform' over the non-reserved ids [num_reserved, vocab_size) (BERT,
      ALBERT draw uniformly over their vocabulary), or 'unigram', the token at
      a uniformly random position of the batch holding a non-reserved id: a
      draw from the corpus's token stream, as SpanBERT's
      `np.random.choice(tokens)` over the whole corpus (here the stream is the
      batch's, the corpus's in expectation; [UNK] is left out).
  """
  if replacement not in REPLACEMENTS:
    raise ValueError(f"replacement={replacement!r}; choose one of {REPLACEMENTS}")
  input_ids = jnp.asarray(input_ids, jnp.int32)  # NumPy callers often pass int64
  seq_len = input_ids.shape[1]
  masked = unit >= 0
  pos = jnp.broadcast_to(jnp.arange(seq_len), input_ids.shape)
  prev_unit = jnp.pad(unit[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  next_unit = jnp.pad(unit[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
  first = masked & (unit != prev_unit)
  last = masked & (unit != next_unit)
  span_id = jnp.where(masked, jnp.cumsum(first, axis=1, dtype=jnp.int32) - 1, -1)
  left = lax.cummax(jnp.where(first, pos, 0), axis=1) - 1
  right = lax.cummin(jnp.where(last, pos, seq_len), axis=1, reverse=True) + 1
  left = jnp.where(masked, jnp.clip(left, 0, seq_len - 1), 0).astype(jnp.int32)
  right = jnp.where(masked, jnp.clip(right, 0, seq_len - 1), 0).astype(jnp.int32)

  decision_rng, random_rng = jax.random.split(rng)
  u = jax.random.uniform(decision_rng, input_ids.shape)
  if per_unit:
    u = jnp.take_along_axis(u, jnp.maximum(span_id, 0), axis=1)
  if replacement == "uniform":
    random_ids = jax.random.randint(
        random_rng, input_ids.shape, num_reserved, vocab_size, dtype=input_ids.dtype
    )
  else:
    text = input_ids >= num_reserved  # the stream without reserved ids ([UNK] included)
    cum = jnp.cumsum(text.ravel().astype(jnp.int32))
    draw = jax.random.randint(random_rng, (input_ids.size,), 0, jnp.maximum(cum[-1], 1))
    where = jnp.searchsorted(cum, draw, side="right")  # the draw-th text token of the batch
    random_ids = input_ids.ravel()[jnp.minimum(where, input_ids.size - 1)].reshape(input_ids.shape)
    # A batch with no text token (only reserved ids, e.g. a lone [MASK]) has no stream to draw
    # from: its "random" replacements keep the token instead of picking up a [PAD].
    random_ids = jnp.where(cum[-1] > 0, random_ids, input_ids)
  corrupted = jnp.where(
      u < mask_prob,
      jnp.asarray(mask_id, input_ids.dtype),
      jnp.where(u < mask_prob + random_prob, random_ids, input_ids),
  )
  return MaskedBatch(
      input_ids=jnp.where(masked, corrupted, input_ids),
      targets=input_ids,
      weights=masked.astype(jnp.float32),
      left=left,
      right=right,
      span_id=span_id,
  )
