"""Input corruption for masked-language-model pretraining.

Three schemes share one output contract (`MaskedBatch`):

* `mask_tokens`: BERT's i.i.d. token masking (Devlin et al., 2019, §3.1).
* `mask_whole_words`: BERT's whole-word masking (google-research/bert,
  `create_pretraining_data.py --do_whole_word_mask`).
* `mask_spans`: SpanBERT's geometric span masking (Joshi et al., 2020, §3.1),
  whose span boundaries feed the span-boundary objective (SBO, §3.2).
* `mask_ngrams`: ALBERT's n-gram masking (Lan et al., 2020, §4.1), n-grams of
  up to 3 whole words with p(n) ∝ 1/n (the span machinery, another length law).

Everything is pure JAX with static shapes so that masking runs on device inside
the jitted train step: each step draws fresh masks from the step's rng (dynamic
masking, Liu et al., 2019) and the host pipeline only ships token ids. All
functions take `[B, L]` int32 ids; `vocab_size`, rates and lengths are static
Python values.

Token-id conventions follow `spanlm.data.tokenizer`: ids below `NUM_RESERVED`
are reserved, `[CLS]`, `[SEP]` and `[PAD]` are never masked (`[UNK]` is an
ordinary token), and random replacements are drawn from
`[NUM_RESERVED, vocab_size)` so they are never special.
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


def max_predictions(seq_len: int, rate: float) -> int:
  """Static upper bound on the number of masked tokens in a row of `seq_len`.

  Use it to size fixed-shape buffers (e.g. gathered MLM positions): no row is
  ever given more than this many masked tokens.
  """
  return math.ceil(rate * seq_len)


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
) -> MaskedBatch:
  """BERT token masking (Devlin et al., 2019, §3.1).

  Exactly `round(rate * n)` of each row's `n` maskable tokens are chosen
  uniformly without replacement (the lowest-ranked random scores), and each is
  independently replaced by [MASK] (`mask_prob`), a random token
  (`random_prob`) or kept. The 10% random / 10% kept tokens reduce the
  mismatch between pretraining inputs, which contain [MASK], and fine-tuning
  inputs, which do not.
  """
  select_rng, corrupt_rng = jax.random.split(rng)
  maskable = ~special_mask(input_ids)
  budget = _budget(maskable, rate)
  scores = jnp.where(maskable, jax.random.uniform(select_rng, input_ids.shape), jnp.inf)
  rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
  unit = jnp.where(rank < budget[:, None], positions, -1)
  return _corrupt(
      corrupt_rng, input_ids, unit, per_unit=False, vocab_size=vocab_size,
      mask_prob=mask_prob, random_prob=random_prob, mask_id=mask_id,
      num_reserved=num_reserved,
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
) -> MaskedBatch:
  """Whole-word masking, as BERT's `create_pretraining_data.py`.

  Words are visited in a uniformly random order and each is masked whole if it
  fits in the row's remaining budget of `round(rate * n)` tokens, else skipped,
  so a row may end slightly under budget. Masking whole words stops the model
  from predicting a word piece from its sibling pieces, which is too easy.
  As in BERT, the 80/10/10 decision is drawn per token, not per word.
  """
  select_rng, corrupt_rng = jax.random.split(rng)
  maskable = ~special_mask(input_ids)
  word = jnp.cumsum(word_starts(input_ids, word_start_table), axis=1) - 1
  word = jnp.maximum(word, 0)  # -1 only before the first word: never maskable.
  budget = _budget(maskable, rate)
  rngs = jax.random.split(select_rng, input_ids.shape[0])
  taken = jax.vmap(_greedy_words)(rngs, word, maskable, budget)
  unit = jnp.where(maskable & jnp.take_along_axis(taken, word, axis=1), word, -1)
  return _corrupt(
      corrupt_rng, input_ids, unit, per_unit=False, vocab_size=vocab_size,
      mask_prob=mask_prob, random_prob=random_prob, mask_id=mask_id,
      num_reserved=num_reserved,
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
) -> MaskedBatch:
  """SpanBERT span masking (Joshi et al., 2020, §3.1).

  Candidates are drawn until the row's budget of `round(rate * n)` tokens is
  spent or `K = _num_span_candidates(L, rate)` candidates are used up. A
  candidate has a length of ℓ whole words, ℓ ~ Geo(`geometric_p`) truncated
  to `[1, max_span]` (p(ℓ) ∝ p(1-p)^(ℓ-1); mean 3.8 words for the paper's
  p=0.2, max 10), and a start word drawn uniformly among the row's words; it
  covers ℓ consecutive words, clipped at the end of the row's text (the span
  never crosses a special token). A candidate overlapping already-masked
  tokens is rejected; one over the remaining budget is shortened to the most
  whole words that fit, or rejected if none do.

  Spans are whole words because SpanBERT masks "complete words" and a span
  cut mid-word would leak the rest of the word. The 80/10/10 decision is made
  once per span, as in the paper, so a span is all [MASK], all random tokens
  or all kept. `left`/`right` give each span's boundary tokens for SBO; as in
  SpanBERT's code, spans may abut, so a boundary can itself be masked.

  Selection is a `lax.scan` over the K candidates per row: O(K·L) work with
  static shapes.
  """
  select_rng, corrupt_rng = jax.random.split(rng)
  batch, seq_len = input_ids.shape
  maskable = ~special_mask(input_ids)
  sample = functools.partial(
      _sample_spans,
      log_probs=jnp.log(_span_length_probs(geometric_p, max_span)),
      num_candidates=_num_span_candidates(seq_len, rate),
  )
  unit = jax.vmap(sample)(
      jax.random.split(select_rng, batch),
      maskable,
      word_starts(input_ids, word_start_table),
      _budget(maskable, rate),
  )
  return _corrupt(
      corrupt_rng, input_ids, unit, per_unit=True, vocab_size=vocab_size,
      mask_prob=mask_prob, random_prob=random_prob, mask_id=mask_id,
      num_reserved=num_reserved,
  )


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
) -> MaskedBatch:
  """ALBERT n-gram masking (Lan et al., 2020, §4.1): p(n) = (1/n) / Σ_{k=1}^{N} 1/k.

  With N = `max_ngram` = 3 (the paper's), n = 1, 2, 3 whole words with
  probabilities 6/11, 3/11, 2/11 (mean 1.64 words). Selection is `mask_spans`'
  (uniform start word, overlap rejection, budget `round(rate * n)` tokens, the
  last candidate shortened to whole words that fit) with this length law in
  place of the geometric one, and one 80/10/10 decision per n-gram.
  """
  select_rng, corrupt_rng = jax.random.split(rng)
  batch, seq_len = input_ids.shape
  maskable = ~special_mask(input_ids)
  sample = functools.partial(
      _sample_spans,
      log_probs=jnp.log(ngram_length_probs(max_ngram)),
      num_candidates=_num_span_candidates(seq_len, rate),
  )
  unit = jax.vmap(sample)(
      jax.random.split(select_rng, batch), maskable,
      word_starts(input_ids, word_start_table), _budget(maskable, rate))
  return _corrupt(
      corrupt_rng, input_ids, unit, per_unit=True, vocab_size=vocab_size,
      mask_prob=mask_prob, random_prob=random_prob, mask_id=mask_id,
      num_reserved=num_reserved,
  )


def ngram_length_probs(max_ngram: int) -> np.ndarray:
  """ALBERT's p(n) ∝ 1/n for n = 1..max_ngram (a static array)."""
  inv = 1.0 / np.arange(1, max_ngram + 1)
  return inv / inv.sum()


def apply_masking(
    rng: jax.Array,
    input_ids: jax.Array,
    word_start_table: jax.Array,
    cfg: Any,
    *,
    vocab_size: int,
) -> MaskedBatch:
  """Dispatches on `cfg.scheme` in `SCHEMES`.

  Reads `cfg.rate`, `cfg.mask_prob`, `cfg.random_prob` and, for spans,
  `cfg.geometric_p` and `cfg.max_span`, falling back to the defaults of the
  scheme functions for any that `cfg` lacks.
  """
  common = dict(
      vocab_size=vocab_size,
      rate=getattr(cfg, "rate", 0.15),
      mask_prob=getattr(cfg, "mask_prob", 0.8),
      random_prob=getattr(cfg, "random_prob", 0.1),
  )
  if cfg.scheme == "token":
    return mask_tokens(rng, input_ids, **common)
  if cfg.scheme == "whole_word":
    return mask_whole_words(rng, input_ids, word_start_table, **common)
  if cfg.scheme == "span":
    return mask_spans(
        rng, input_ids, word_start_table,
        geometric_p=getattr(cfg, "geometric_p", 0.2),
        max_span=getattr(cfg, "max_span", 10),
        **common,
    )
  if cfg.scheme == "ngram":
    return mask_ngrams(rng, input_ids, word_start_table,
                       max_ngram=getattr(cfg, "max_ngram", 3), **common)
  raise ValueError(f"Unknown masking scheme {cfg.scheme!r}; expected one of {SCHEMES}.")


def _budget(maskable: jax.Array, rate: float) -> jax.Array:
  """Per-row number of tokens to mask, int32 `[B]`: `round(rate * n)`.

  At least one token for a row with any maskable token, none for a row without,
  and never more than `max_predictions(L, rate)`.
  """
  n = maskable.sum(axis=1, dtype=jnp.int32)
  budget = jnp.round(rate * n).astype(jnp.int32)
  budget = jnp.where(n > 0, jnp.maximum(budget, 1), 0)
  return jnp.minimum(budget, jnp.minimum(n, max_predictions(maskable.shape[1], rate)))


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


def _span_length_probs(geometric_p: float, max_span: int) -> np.ndarray:
  """p(ℓ) ∝ p(1-p)^(ℓ-1) for ℓ = 1..max_span, renormalised (a static array)."""
  probs = geometric_p * (1 - geometric_p) ** np.arange(max_span)
  return probs / probs.sum()


def _num_span_candidates(seq_len: int, rate: float) -> int:
  """Static number K of span candidates per row.

  A row needs only about budget / 3.8 accepted spans (fewer with multi-piece
  words), but late candidates are often rejected for overlap (start words are
  uniform over all words, masked ones included) and the last few tokens of
  budget can only be filled by short words. Twice the token budget fills
  99.8% of the budget at L=128 and 100% at L=512 on synthetic text, for an
  O(rate · L²) scan.
  """
  return max(2 * max_predictions(seq_len, rate), 1)


def _sample_spans(
    rng: jax.Array,
    maskable: jax.Array,
    starts: jax.Array,
    budget: jax.Array,
    *,
    log_probs: jax.Array,
    num_candidates: int,
) -> jax.Array:
  """One row of `mask_spans` selection: int32 `[L]`, candidate index or -1."""
  seq_len = maskable.shape[0]
  pos = jnp.arange(seq_len)
  next_maskable = jnp.append(maskable[1:], False)
  next_start = jnp.append(starts[1:], True)
  ends = maskable & (~next_maskable | next_start)
  # Last token of the text segment (run of maskable tokens) at each position.
  segment_end = lax.cummin(jnp.where(ends & ~next_maskable, pos, seq_len), reverse=True)
  n_words = starts.sum(dtype=jnp.int32)
  start_pos = jnp.nonzero(starts, size=seq_len)[0]
  end_pos = jnp.nonzero(ends, size=seq_len)[0]

  len_rng, start_rng = jax.random.split(rng)
  n_span_words = jax.random.categorical(len_rng, log_probs, shape=(num_candidates,)) + 1
  first_word = jax.random.randint(start_rng, (num_candidates,), 0, jnp.maximum(n_words, 1))

  def step(carry, candidate):
    unit, count = carry
    k, n, w = candidate
    s = start_pos[w]
    e = jnp.minimum(end_pos[jnp.minimum(w + n, n_words) - 1], segment_end[s])
    overlaps = jnp.any((unit >= 0) & (pos >= s) & (pos <= e))
    # Shorten to the last word end that fits in the remaining budget.
    e = jnp.minimum(e, s + budget - count - 1)
    e = jnp.max(jnp.where(ends & (pos >= s) & (pos <= e), pos, -1))
    accept = (n_words > 0) & ~overlaps & (e >= s)
    new = accept & (pos >= s) & (pos <= e)
    return (jnp.where(new, k, unit), count + new.sum(dtype=jnp.int32)), None

  init = (jnp.full(seq_len, -1, jnp.int32), jnp.int32(0))
  candidates = (jnp.arange(num_candidates, dtype=jnp.int32), n_span_words, first_word)
  (unit, _), _ = lax.scan(step, init, candidates)
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
  """
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
  random_ids = jax.random.randint(
      random_rng, input_ids.shape, num_reserved, vocab_size, dtype=input_ids.dtype
  )
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
