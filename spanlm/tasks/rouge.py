"""ROUGE-N and ROUGE-L (Lin 2004), the greedy extractive oracle and trigram blocking.

Texts are lower-cased and tokenized into runs of letters/digits (no stemming,
no stop-word removal), so scores are close to but not identical with the Perl
ROUGE-1.5.5 used in papers (which stems with Porter's stemmer and computes
summary-level ROUGE-L as a union LCS over sentences).

  ROUGE-N: P = |C ∩ R| / |C|, R = |C ∩ R| / |R| over multisets of n-grams
           (counts clipped), F = 2PR / (P + R).
  ROUGE-L: P = LCS(c, r) / |c|, R = LCS(c, r) / |r|, F = 2PR / (P + R)
           over the whole token sequences (β = 1).

Greedy oracle (Nallapati et al. 2017; Liu & Lapata 2019, §4.1): starting
from the empty summary, repeatedly add the sentence that most increases
ROUGE-1 F + ROUGE-2 F of the summary against the reference; stop when no
sentence increases it or `max_sentences` are selected.

Trigram blocking (Paulus et al. 2018; Liu & Lapata 2019, §4.1): going down
the sentences by score, skip a sentence that shares a trigram with the
summary so far.
"""

from __future__ import annotations

import collections
import re

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str | list[str]) -> list[str]:
  """Lower-cased runs of [a-z0-9]; a list of tokens is joined first."""
  if not isinstance(text, str):
    text = " ".join(text)
  return _TOKEN.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _prf(overlap: float, n_cand: int, n_ref: int) -> dict[str, float]:
  p = overlap / n_cand if n_cand else 0.0
  r = overlap / n_ref if n_ref else 0.0
  return {"p": p, "r": r, "f": 2 * p * r / (p + r) if p + r else 0.0}


def rouge_n(candidate: list[str], reference: list[str], n: int) -> dict[str, float]:
  c, r = ngrams(candidate, n), ngrams(reference, n)
  return _prf(sum((c & r).values()), sum(c.values()), sum(r.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
  """Length of the longest common subsequence (O(|a|·|b|) dynamic programme, one row kept)."""
  if len(a) < len(b):
    a, b = b, a
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(candidate: list[str], reference: list[str]) -> dict[str, float]:
  return _prf(lcs_length(candidate, reference), len(candidate), len(reference))


def rouge(candidate: str | list[str], reference: str | list[str]) -> dict[str, float]:
  """{'rouge_1', 'rouge_2', 'rouge_l'}: F1 scores in [0, 1] of two texts (or token lists)."""
  c, r = tokenize(candidate), tokenize(reference)
  return {"rouge_1": rouge_n(c, r, 1)["f"], "rouge_2": rouge_n(c, r, 2)["f"],
          "rouge_l": rouge_l(c, r)["f"]}


def greedy_oracle(sentences: list[list[str]], reference: list[str], max_sentences: int = 3) -> list[int]:
  """Indices (in document order) of the greedy ROUGE-1+2 oracle summary; see the module docstring."""
  sents = [tokenize(s) for s in sentences]
  ref = tokenize(reference)
  selected, summary, best = [], [], 0.0
  for _ in range(max_sentences):
    gains = []
    for i, s in enumerate(sents):
      if i in selected:
        continue
      cand = summary + s
      gains.append((rouge_n(cand, ref, 1)["f"] + rouge_n(cand, ref, 2)["f"], -i))
    if not gains:
      break
    score, neg_i = max(gains)
    if score <= best:
      break
    best = score
    selected.append(-neg_i)
    summary = summary + sents[-neg_i]
  return sorted(selected)


def trigrams(tokens: list[str]) -> set[tuple[str, ...]]:
  return set(ngrams(tokens, 3))


def select_with_trigram_blocking(sentences: list[list[str]], scores, k: int = 3,
                                 block: bool = True) -> list[int]:
  """Top-k sentence indices by score, skipping any that repeats a trigram of those chosen; document order."""
  order = sorted(range(len(sentences)), key=lambda i: (-float(scores[i]), i))
  chosen, seen = [], set()
  for i in order:
    tri = trigrams(tokenize(sentences[i]))
    if block and tri & seen:
      continue
    chosen.append(i)
    seen |= tri
    if len(chosen) == k:
      break
  return sorted(chosen)
