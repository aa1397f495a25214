"""BERTSUM's n-gram pieces as PreSumm has them, and reported ROUGE through `rouge-score`.

Our own n-gram code is only what PreSumm itself computes (nlpyang/PreSumm):

Greedy oracle (`src/prepro/data_builder.py::greedy_selection`; Nallapati et al. 2017,
Liu & Lapata 2019 §4.1). Each sentence and the joined reference are cleaned with
`re.sub(r'[^a-zA-Z0-9 ]', '', text)` (punctuation and non-ASCII letters removed inside
tokens: "u.s." -> "us") and split on spaces; PreSumm lower-cases the text before
(`format_to_lines`, --lower), so `clean` lower-cases too. ROUGE-N here is over *sets*
of n-grams,

  P = |C ∩ R| / |C|,  R = |C ∩ R| / |R|,  F = 2PR / (P + R + 1e-8),

with C the union of the selected sentences' n-gram sets. Starting from nothing, add the
sentence that most raises F1(1-grams) + F1(2-grams) (strictly; ties to the earlier
sentence); stop when none does or `max_sentences` are chosen. Indices in document order.

Trigram blocking (`src/models/trainer_ext.py::test`; Paulus et al. 2018): going down the
sentences by score, skip one whose whitespace-token trigram set meets that of any
sentence already chosen, until `k` are chosen. PreSumm writes the summary in that score
order (ROUGE-L depends on the order); `document_order=True` sorts it instead.

Reported ROUGE: Google's `rouge-score` package (`pip install rouge-score`, the
`summarization` extra), ROUGE-1/2 and ROUGE-Lsum F1 with the Porter stemmer and
sentences on separate lines: the reimplementation of ROUGE-1.5.5 `-m` (stemming) with
summary-level LCS that papers report.
"""

from __future__ import annotations

import re

_CLEAN = re.compile(r"[^a-zA-Z0-9 ]")


def clean(tokens: list[str]) -> list[str]:
  """PreSumm's `_rouge_clean` of a lower-cased sentence, split on spaces."""
  return _CLEAN.sub("", " ".join(tokens).lower()).split()


def ngram_set(tokens: list[str], n: int) -> set[tuple[str, ...]]:
  return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def set_f1(candidate: set, reference: set) -> float:
  """PreSumm's `cal_rouge` F: over n-gram sets, with +1e-8 in the denominator."""
  overlap = len(candidate & reference)
  p = overlap / len(candidate) if candidate else 0.0
  r = overlap / len(reference) if reference else 0.0
  return 2.0 * (p * r) / (p + r + 1e-8)


def greedy_oracle(sentences: list[list[str]], reference: list[list[str]], max_sentences: int = 3) -> list[int]:
  """Indices (document order) of PreSumm's greedy ROUGE-1+2 oracle; `reference`: its sentences."""
  ref = clean([t for s in reference for t in s])
  ref1, ref2 = ngram_set(ref, 1), ngram_set(ref, 2)
  sents = [clean(s) for s in sentences]
  grams1, grams2 = [ngram_set(s, 1) for s in sents], [ngram_set(s, 2) for s in sents]
  selected, best = [], 0.0
  for _ in range(max_sentences):
    cur_best, cur_id = best, -1
    for i in range(len(sents)):
      if i in selected:
        continue
      c = selected + [i]
      score = set_f1(set().union(*(grams1[j] for j in c)), ref1) + \
          set_f1(set().union(*(grams2[j] for j in c)), ref2)
      if score > cur_best:
        cur_best, cur_id = score, i
    if cur_id == -1:
      break
    selected.append(cur_id)
    best = cur_best
  return sorted(selected)


def select_with_trigram_blocking(sentences: list[list[str]], scores, k: int = 3, block: bool = True,
                                 document_order: bool = False) -> list[int]:
  """Indices of the top-k sentences by score, skipping any that shares a trigram with one already
  chosen (PreSumm); in score order, or in document order with `document_order`."""
  order = sorted(range(len(sentences)), key=lambda i: (-float(scores[i]), i))
  chosen = []
  for i in order:
    tri = ngram_set([t.lower() for t in sentences[i]], 3)
    if block and any(tri & ngram_set([t.lower() for t in sentences[j]], 3) for j in chosen):
      continue
    chosen.append(i)
    if len(chosen) == k:
      break
  return sorted(chosen) if document_order else chosen


_SCORER = None


def rouge(candidate: list[str], reference: list[str]) -> dict[str, float]:
  """{'rouge_1', 'rouge_2', 'rouge_lsum'}: F1 in [0, 1] of a candidate and a reference, each a list
  of sentences (rouge-score, Porter stemmer, ROUGE-Lsum over the sentences)."""
  global _SCORER
  if _SCORER is None:
    try:
      from rouge_score import rouge_scorer
    except ImportError:
      raise ImportError("reported ROUGE needs the rouge-score package: pip install rouge-score "
                        "(or pip install -e '.[summarization]')") from None
    _SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
  s = _SCORER.score("\n".join(reference), "\n".join(candidate))  # (target, prediction)
  return {"rouge_1": s["rouge1"].fmeasure, "rouge_2": s["rouge2"].fmeasure, "rouge_lsum": s["rougeLsum"].fmeasure}
