"""The official SQuAD metrics: exact match and token F1 (v1.1 and v2.0).

Re-implemented from the behaviour of the official scripts (`evaluate-v1.1.py`,
`evaluate-v2.0.py`, Rajpurkar et al. 2016, 2018); no code is copied.

  normalize(s) = collapse_whitespace(drop_articles(strip_punctuation(lower(s))))
  EM(p, g) = [normalize(p) == normalize(g)]
  F1(p, g) = 2·P·R / (P + R),  P = |p ∩ g| / |p|,  R = |p ∩ g| / |g|
             over the multisets of whitespace tokens of the normalised strings;

per question the maximum over its gold answers, then the mean over questions,
reported ×100. Known behaviours kept on purpose:

* v1.1: a question with no prediction scores 0 (and is counted in the total);
  F1 with an empty side is 0.
* v2.0: gold answers that normalise to "" are dropped; an unanswerable question
  has the single gold answer "", so the empty prediction scores EM = F1 = 1 and
  any other prediction 0 (F1 with an empty side is [both empty]). Given a
  null-odds file (qid -> score, higher = more likely unanswerable), a question
  whose odds exceed the threshold is scored as if the prediction were "", and
  `best_exact`/`best_f1` report the score at the best threshold found by
  sweeping the questions in increasing odds.
  Unlike the official v2 script (which then crashes on the HasAns/NoAns
  subsets), a missing prediction here scores 0, as in v1.1, and is counted.
"""

from __future__ import annotations

import collections
import re
import string

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
  """Lower case, strip ASCII punctuation, drop a/an/the, collapse whitespace."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
  return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, gold: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, v2: bool = False) -> float:
  pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if v2 and (not pred or not ref):
    return float(pred == ref)  # v2.0: both empty (a correct no-answer) = 1
  common = collections.Counter(pred) & collections.Counter(ref)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def gold_answers(qa: dict, v2: bool) -> list[str]:
  """The texts a prediction is compared with ([""] for an unanswerable v2 question)."""
  texts = [a["text"] for a in qa.get("answers", [])]
  if v2:
    texts = [t for t in texts if normalize_answer(t)]
  # A question without answers (any v2.0 unanswerable one, or a v1.1-style file that has one)
  # is scored against "" as the official v2.0 script does; the v1.1 script would crash.
  return texts or [""]


def is_v2(dataset: dict) -> bool:
  """v2.0 files say so in 'version' or have `is_impossible` questions."""
  if str(dataset.get("version", "")).startswith("v2"):
    return True
  return any("is_impossible" in qa for art in dataset.get("data", [])
             for p in art.get("paragraphs", []) for qa in p.get("qas", []))


def raw_scores(questions: dict[str, list[str]], predictions: dict[str, str], v2: bool):
  """qid -> (EM, F1) as max over the gold answers; also the list of qids without a prediction."""
  exact, f1s, missing = {}, {}, []
  for qid, golds in questions.items():
    if qid not in predictions:
      missing.append(qid)
      exact[qid] = f1s[qid] = 0.0
      continue
    pred = predictions[qid] if isinstance(predictions[qid], str) else str(predictions[qid])
    exact[qid] = max(exact_match(pred, g) for g in golds)
    f1s[qid] = max(f1(pred, g, v2) for g in golds)
  return exact, f1s, missing


def apply_threshold(scores: dict, na_probs: dict, has_ans: dict, threshold: float) -> dict:
  """Questions with null odds > threshold are scored as an empty prediction."""
  return {q: (float(not has_ans[q]) if na_probs.get(q, 0.0) > threshold else s)
          for q, s in scores.items()}


def best_threshold(predictions: dict, scores: dict, na_probs: dict, has_ans: dict):
  """Sweep thresholds at each question's null odds (ascending); best score ×100 and its threshold.

  Start with every question predicted unanswerable (score = #NoAns); answering
  question q (odds <= threshold) adds its score if it has an answer, and costs
  1 if it has none but the prediction is non-empty.
  """
  current = best = float(sum(not has_ans[q] for q in scores))
  thresh = 0.0
  for q in sorted(scores, key=lambda q: na_probs.get(q, 0.0)):
    if has_ans[q]:
      current += scores[q]
    elif predictions.get(q, ""):
      current -= 1.0
    if current > best:
      best, thresh = current, na_probs.get(q, 0.0)
  return 100.0 * best / max(len(scores), 1), thresh


def _mean(scores: dict, qids) -> float:
  qids = list(qids)
  return 100.0 * sum(scores[q] for q in qids) / max(len(qids), 1)


def evaluate(dataset: dict, predictions: dict[str, str], na_probs: dict[str, float] | None = None,
             na_threshold: float = 1.0, v2: bool | None = None) -> dict:
  """The official numbers for a SQuAD-format `dataset` ({'data': [...]}) and {qid: answer}.

  Returns {'exact_match', 'f1', 'total', 'missing'} and, for v2.0, HasAns_/NoAns_
  subsets and (with `na_probs`) best_exact/best_f1 with their thresholds.
  """
  v2 = is_v2(dataset) if v2 is None else v2
  questions = {qa["id"]: gold_answers(qa, v2)
               for art in dataset["data"] for p in art["paragraphs"] for qa in p["qas"]}
  exact, f1s, missing = raw_scores(questions, predictions, v2)
  out = {}
  if v2:
    na_probs = na_probs or {}
    has_ans = {q: bool(g != [""]) for q, g in questions.items()}
    exact_t = apply_threshold(exact, na_probs, has_ans, na_threshold)
    f1_t = apply_threshold(f1s, na_probs, has_ans, na_threshold)
    out.update(exact_match=_mean(exact_t, questions), f1=_mean(f1_t, questions))
    for name, keep in (("HasAns", True), ("NoAns", False)):
      qids = [q for q in questions if has_ans[q] == keep]
      if qids:
        out.update({f"{name}_exact": _mean(exact_t, qids), f"{name}_f1": _mean(f1_t, qids),
                    f"{name}_total": len(qids)})
    if na_probs:
      out["best_exact"], out["best_exact_thresh"] = best_threshold(predictions, exact, na_probs, has_ans)
      out["best_f1"], out["best_f1_thresh"] = best_threshold(predictions, f1s, na_probs, has_ans)
  else:
    out.update(exact_match=_mean(exact, questions), f1=_mean(f1s, questions))
  out.update(total=len(questions), missing=len(missing))
  unanswerable = sum(g == [""] for g in questions.values())
  if not v2 and unanswerable:
    out["questions_without_answers"] = unanswerable
  return out
