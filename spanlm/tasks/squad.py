"""SQuAD v1.1 / v2.0 span extraction (Devlin et al. 2019, §4.2-4.3).

Input: [CLS] question [SEP] context window [SEP], segment 0 for the question
and 1 for the context. Contexts longer than the window are cut into windows
of `max_seq_len - |question| - 3` tokens whose starts are `doc_stride` tokens
apart, so every context token is in at least one window. Two linear heads give
start and end logits; the loss is the mean of the two cross-entropies
against the gold start/end token (the [CLS] position when the window does not
contain the answer, or the question is unanswerable).

Decoding: in each window, with log P_start and log P_end the log-softmax of the
window's logits, the best span is

  argmax_{i <= j, j - i + 1 <= max_answer_length} log P_start(i) + log P_end(j)

over context tokens, with i restricted to tokens for which this window gives
the most context (BERT's rule: max over windows of min(left, right) context,
ties to the longer window), so a token is scored where it is best seen. The
top-n spans of all windows are merged, and the best is mapped back to the
original text through each token's character offsets.

v2.0: the null score of a window is log P_start([CLS]) + log P_end([CLS]);
with s_null the minimum over windows (the window most sure there is an answer)
and s_best the best span score, the null odds are s_null - s_best, and the
prediction is "" when the odds exceed a threshold tuned on dev (the threshold
maximising F1, the official script's `best_f1_thresh`).

Data: the official SQuAD JSON. Answer offsets are recovered from the answer
text (the occurrence nearest to the given `answer_start`; the offsets of the
reconstructed dev files in ../shared are approximate), and answers absent from
their context are counted. `split_articles` gives a deterministic by-title
split of one file for honest training and evaluation on the dev sets alone.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import unicodedata

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spanlm import paths
from spanlm.models.bert import BertConfig, BertEncoder, dense
from spanlm.tasks import squad_metrics
from spanlm.tasks.base import Features, Progress, Task, masked_sum


# --- data --------------------------------------------------------------------------------

@dataclasses.dataclass
class Example:
  qid: str
  title: str
  question: str
  context: str
  answers: list[str]  # gold texts (all annotators); [] when unanswerable
  answer_start: int = -1  # recovered char offset of answers[0] in context (-1: none / not found)
  is_impossible: bool = False


def recover_offset(context: str, text: str, hint: int) -> int:
  """Char offset of `text` in `context`: the occurrence nearest to `hint`, or -1."""
  if not text:
    return -1
  starts, i = [], context.find(text)
  while i >= 0:
    starts.append(i)
    i = context.find(text, i + 1)
  if not starts:
    return -1
  return min(starts, key=lambda s: (abs(s - hint), s))


def parse_squad(dataset, report: collections.Counter | None = None) -> list[Example]:
  """SQuAD JSON (already decoded) -> Examples; malformed entries are counted and skipped."""
  report = report if report is not None else collections.Counter()
  if not isinstance(dataset, dict) or not isinstance(dataset.get("data"), list):
    raise ValueError("not a SQuAD file: expected a JSON object with a 'data' list of articles")
  examples = []
  for article in dataset["data"]:
    if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
      report["skipped_malformed_articles"] += 1
      continue
    title = str(article.get("title", ""))
    for para in article["paragraphs"]:
      if not isinstance(para, dict) or not isinstance(para.get("context"), str) \
          or not isinstance(para.get("qas"), list):
        report["skipped_malformed_paragraphs"] += 1
        continue
      context = para["context"]
      for qa in para["qas"]:
        try:
          qid, question = str(qa["id"]), str(qa["question"])
          answers = [a for a in qa.get("answers", []) if isinstance(a.get("text"), str)]
          impossible = bool(qa.get("is_impossible", False)) or not answers
        except (KeyError, TypeError, AttributeError):
          report["skipped_malformed_questions"] += 1
          continue
        ex = Example(qid, title, question, context, [a["text"] for a in answers], -1, impossible)
        if answers:
          hint = answers[0].get("answer_start", 0)
          ex.answer_start = recover_offset(context, answers[0]["text"],
                                           hint if isinstance(hint, int) else 0)
          if ex.answer_start < 0:
            report["answers_not_in_context"] += 1
          elif ex.answer_start != hint:
            report["answer_offsets_moved"] += 1
        report["questions"] += 1
        report["unanswerable"] += int(impossible)
        examples.append(ex)
  return examples


def read_squad_json(path: str) -> dict:
  """The decoded SQuAD file (local or gs://), with a clear error for a missing, non-JSON or non-SQuAD
  file."""
  if not paths.is_file(path):
    raise FileNotFoundError(f"SQuAD file {path!r} not found; set config.data.train_file / eval_file")
  try:
    raw = json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); expected the SQuAD format") from e
  if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
    raise ValueError(f"{path}: not a SQuAD file: expected a JSON object with a 'data' list of articles")
  return raw


def load_squad(path: str, report: collections.Counter | None = None) -> tuple[dict, list[Example]]:
  """(raw JSON, Examples) from a SQuAD file."""
  raw = read_squad_json(path)
  return raw, parse_squad(raw, report)


def split_articles(dataset: dict, part: str, eval_fraction: float = 0.2) -> dict:
  """A deterministic article-level split of one SQuAD file: 'train' or 'eval'.

  Articles are ordered by sha1(title) (independent of the file's order) and
  the last round(eval_fraction · n) go to 'eval', so no paragraph of an eval
  article is ever trained on.
  """
  if part not in ("train", "eval"):
    raise ValueError(f"split part {part!r}: use 'train' or 'eval'")
  articles = sorted(dataset["data"], key=lambda a: hashlib.sha1(
      str(a.get("title", "")).encode("utf-8")).hexdigest() if isinstance(a, dict) else "")
  n_eval = int(round(eval_fraction * len(articles)))
  chosen = articles[len(articles) - n_eval:] if part == "eval" else articles[:len(articles) - n_eval]
  return {**{k: v for k, v in dataset.items() if k != "data"}, "data": chosen}


# --- tokenisation with character offsets -------------------------------------------------

def _is_punct(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def pre_tokenize(text: str) -> list[tuple[int, int]]:
  """BERT's basic split as character spans: whitespace separates, punctuation stands alone."""
  spans, start = [], None
  for i, ch in enumerate(text):
    if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\t\n\r":
      if start is not None:
        spans.append((start, i))
        start = None
    elif _is_punct(ch):
      if start is not None:
        spans.append((start, i))
        start = None
      spans.append((i, i + 1))
    elif start is None:
      start = i
  if start is not None:
    spans.append((start, len(text)))
  return spans


def _piece_len(piece: str) -> int:
  for prefix in ("##", "\u2581"):
    if piece.startswith(prefix):
      return len(piece) - len(prefix)
  return len(piece)


def tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  """Token ids and each token's [start, end) character span in `text`.

  The tokenizer's own `encode_with_offsets` when it has one (WordPiece).
  Otherwise each pre-token (word or punctuation mark) is encoded alone, so every token
  lies inside one pre-token; within it, sub-token boundaries follow the pieces'
  lengths ('##'/'▁' removed), clipped to the pre-token, the last ending at its
  end (accent stripping or [UNK] can change lengths, never the outer bounds).
  """
  if hasattr(tokenizer, "encode_with_offsets"):
    try:  # WordPiece gives exact offsets itself
      ids, offsets = tokenizer.encode_with_offsets(text)
      return [int(i) for i in ids], [tuple(map(int, o)) for o in offsets]
    except NotImplementedError:
      pass
  ids, offsets = [], []
  for s, e in pre_tokenize(text):
    pieces = tokenizer.encode(text[s:e])
    pos = s
    for k, t in enumerate(pieces):
      end = e if k == len(pieces) - 1 else min(e, pos + max(_piece_len(tokenizer.id_to_piece(t)), 1))
      ids.append(int(t))
      offsets.append((min(pos, end), end))
      pos = end
  return ids, offsets


def char_to_token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
  """Tokens [i, j] covering characters [start, end): first token ending after start, last starting before end."""
  i = next((k for k, (_, e) in enumerate(offsets) if e > start), -1)
  j = next((k for k in range(len(offsets) - 1, -1, -1) if offsets[k][0] < end), -1)
  return i, j


# --- windows -----------------------------------------------------------------------------

def window_starts(num_tokens: int, window: int, stride: int) -> list[int]:
  """Start offsets of windows of `window` tokens, `stride` apart, the last reaching the end."""
  if window <= 0:
    raise ValueError(f"window of {window} tokens: max_seq_len is too short for the question")
  starts, s = [], 0
  while True:
    starts.append(s)
    if s + window >= num_tokens:
      return starts
    s += min(window, stride)


def max_context(starts: list[int], window: int, num_tokens: int) -> np.ndarray:
  """[W, T] bool: whether window w gives token t its maximal context (BERT's rule).

  score(w, t) = min(t - start_w, end_w - t) + 0.01 · len_w over windows holding t;
  the first window with the best score wins.
  """
  best = np.full(num_tokens, -np.inf)
  owner = np.full(num_tokens, -1)
  t = np.arange(num_tokens)
  for w, s in enumerate(starts):
    length = min(window, num_tokens - s)
    inside = (t >= s) & (t < s + length)
    score = np.minimum(t - s, s + length - 1 - t) + 0.01 * length
    better = inside & (score > best)
    best[better], owner[better] = score[better], w
  return owner[None, :] == np.arange(len(starts))[:, None]


@dataclasses.dataclass
class WindowMeta:
  """What decoding needs per row: its example, and per position its char span and context flags."""
  example: int
  offsets: np.ndarray  # [L, 2] int32, char span in the context (-1 outside the context)
  is_max_context: np.ndarray  # [L] bool, context tokens best seen in this window


def featurize(examples: list[Example], tokenizer, max_seq_len: int, doc_stride: int = 128,
              max_query_len: int = 64, training: bool = False,
              report: collections.Counter | None = None, name: str = "SQuAD") -> Features:
  """Examples -> one row per (example, window), BERT's run_squad layout.

  In training, rows of an answerable question whose answer was not found in
  its context are skipped (counted); an answer outside a window gives that
  window the [CLS] target.
  """
  report = report if report is not None else collections.Counter()
  cls_id, sep_id, pad_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
  progress = Progress(f"{name}: tokenizing", len(examples), "questions")
  rows = collections.defaultdict(list)
  meta = []
  context_cache = {}
  for n, ex in enumerate(examples):
    progress.update(n)
    if training and not ex.is_impossible and ex.answer_start < 0:
      report["skipped_answer_not_found"] += 1
      continue
    q_ids = tokenizer.encode(ex.question)
    if len(q_ids) > max_query_len:
      report["truncated_questions"] += 1
      q_ids = q_ids[:max_query_len]
    if ex.context not in context_cache:
      context_cache = {ex.context: tokenize_with_offsets(tokenizer, ex.context)}
    c_ids, c_off = context_cache[ex.context]
    window = max_seq_len - len(q_ids) - 3
    starts = window_starts(len(c_ids), window, doc_stride)
    if len(starts) > 1:
      report["long_contexts_windowed"] += 1
    is_max = max_context(starts, window, len(c_ids))
    tok_start = tok_end = -1
    if not ex.is_impossible and ex.answer_start >= 0:
      tok_start, tok_end = char_to_token_span(c_off, ex.answer_start,
                                              ex.answer_start + len(ex.answers[0]))
    for w, s in enumerate(starts):
      length = min(window, len(c_ids) - s)
      ids = [cls_id, *q_ids, sep_id, *c_ids[s:s + length], sep_id]
      first = len(q_ids) + 2  # position of the window's first context token
      segs = [0] * first + [1] * (length + 1)
      offsets = np.full((max_seq_len, 2), -1, np.int32)
      offsets[first:first + length] = c_off[s:s + length]
      maxc = np.zeros(max_seq_len, bool)
      maxc[first:first + length] = is_max[w, s:s + length]
      start_pos = end_pos = 0
      if tok_start >= s and tok_end < s + length:
        start_pos, end_pos = tok_start - s + first, tok_end - s + first
      pad = max_seq_len - len(ids)
      rows["input_ids"].append(ids + [pad_id] * pad)
      rows["segment_ids"].append(segs + [0] * pad)
      rows["attention_mask"].append([1] * len(ids) + [0] * pad)
      rows["start_positions"].append(start_pos)
      rows["end_positions"].append(end_pos)
      meta.append(WindowMeta(n, offsets, maxc))
  progress.update(len(examples))
  progress.done()
  arrays = {k: np.asarray(v, np.int32) for k, v in rows.items()}
  if not meta:
    raise ValueError("no SQuAD rows: every question was skipped ("
                     + ", ".join(f"{k}={v}" for k, v in sorted(report.items())) + ")")
  report["rows"] = len(meta)
  report["examples"] = len(examples)
  return Features(arrays, {"windows": meta, "examples": examples}, dict(report))


# --- decoding ----------------------------------------------------------------------------

def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max()
  return x - m - np.log(np.exp(x - m).sum())


def span_scores(start_logp, end_logp, start_ok, end_ok, max_answer_length: int) -> np.ndarray:
  """[L, L] score of span (i, j), -inf where i > j, j - i + 1 > max_answer_length or i/j not allowed."""
  n = len(start_logp)
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  valid = (j >= i) & (j - i < max_answer_length) & start_ok[:, None] & end_ok[None, :]
  return np.where(valid, start_logp[:, None] + end_logp[None, :], -np.inf)


def best_spans(start_logits, end_logits, window: WindowMeta, max_answer_length: int, n_best: int):
  """Top-n (score, i, j) in one window: i a max-context token, j a context token."""
  s, e = _log_softmax(start_logits), _log_softmax(end_logits)
  in_context = window.offsets[:, 0] >= 0
  scores = span_scores(s, e, window.is_max_context & in_context, in_context, max_answer_length)
  flat = scores.ravel()
  k = min(n_best, int(np.isfinite(flat).sum()))
  if k == 0:
    return [], float(s[0] + e[0])
  top = np.argpartition(-flat, k - 1)[:k]
  top = top[np.argsort(-flat[top], kind="stable")]
  n = len(s)
  return [(float(flat[t]), int(t // n), int(t % n)) for t in top], float(s[0] + e[0])


def decode(start_logits: np.ndarray, end_logits: np.ndarray, features: Features,
           max_answer_length: int = 30, n_best: int = 20):
  """Per example: the best answer text, its score, the null score and the n-best list.

  Returns {qid: {'text', 'score', 'null_score', 'null_odds', 'nbest': [(text, score)]}}.
  """
  windows, examples = features.meta["windows"], features.meta["examples"]
  per_example = collections.defaultdict(list)
  for r, w in enumerate(windows):
    per_example[w.example].append(r)
  out = {}
  for n, rows in per_example.items():
    if rows[-1] >= len(start_logits):  # rows capped away (config.task.max_eval_examples): no prediction
      continue
    ex = examples[n]
    cands, null = [], np.inf
    for r in rows:
      spans, null_r = best_spans(start_logits[r], end_logits[r], windows[r], max_answer_length, n_best)
      null = min(null, null_r)
      off = windows[r].offsets
      cands += [(score, ex.context[off[i, 0]:off[j, 1]]) for score, i, j in spans]
    cands.sort(key=lambda c: -c[0])
    seen, nbest = set(), []
    for score, text in cands:
      if text not in seen:
        seen.add(text)
        nbest.append((text, score))
      if len(nbest) == n_best:
        break
    text, score = nbest[0] if nbest else ("", -np.inf)
    out[ex.qid] = dict(text=text, score=score, null_score=null, null_odds=null - score, nbest=nbest)
  return out


def answers_at_threshold(decoded: dict, threshold: float | None) -> dict[str, str]:
  """{qid: text}; with a threshold (v2.0), "" where the null odds exceed it."""
  if threshold is None:
    return {q: d["text"] for q, d in decoded.items()}
  return {q: ("" if d["null_odds"] > threshold else d["text"]) for q, d in decoded.items()}


# --- model -------------------------------------------------------------------------------

class BertForQuestionAnswering(nn.Module):
  """Encoder + one Dense(2) giving start and end logits at every position."""

  cfg: BertConfig

  def setup(self):
    self.encoder = BertEncoder(self.cfg)
    self.qa_outputs = dense(self.cfg, 2, ("embed", "classes"), "qa_outputs")

  def __call__(self, batch, deterministic: bool = True):
    hidden = self.encoder(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                          deterministic=deterministic)
    if isinstance(hidden, tuple):
      hidden = hidden[0]
    logits = self.qa_outputs(hidden).astype(jnp.float32)
    # Padding can never be a start or an end.
    logits = jnp.where(batch["attention_mask"][..., None] > 0, logits, -1e9)
    return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}


def span_loss(outputs, batch):
  """Per row: (CE(start) + CE(end)) / 2, as in BERT's run_squad."""
  def ce(logits, target):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]

  return 0.5 * (ce(outputs["start_logits"], batch["start_positions"])
                + ce(outputs["end_logits"], batch["end_positions"]))


# --- the task ----------------------------------------------------------------------------

def extend_config(c) -> None:
  """Declare config.squad (and the data files) on a fine-tuning config: the one place they are set."""
  import ml_collections

  with c.unlocked():
    c.data.train_file = ""  # SQuAD train JSON (or the one file split by article)
    c.data.eval_file = ""  # SQuAD dev JSON scored by the official rules
    c.squad = ml_collections.ConfigDict()
    c.squad.version = "1.1"  # 1.1 | 2.0 (null answers, threshold tuned on dev)
    c.squad.doc_stride = 128  # tokens between the starts of consecutive context windows
    c.squad.max_query_len = 64  # question tokens kept (longer questions are truncated, counted)
    c.squad.max_answer_length = 30  # longest answer span in tokens
    c.squad.n_best = 20  # candidate spans kept per window and per question
    c.squad.split_by_article = False  # train/eval from one file split 80/20 by article title
    c.squad.eval_fraction = 0.2  # share of articles held out when split_by_article
    c.squad.max_eval_examples = 0  # cap on evaluated questions, first N (0 = all); for CPU runs
    c.squad.threshold_from = "eval"  # v2.0 null threshold tuned on: eval (BERT: the dev set itself) |
    #                                   train_holdout (held-out training articles, never trained on)
    c.squad.threshold_holdout_fraction = 0.1  # share of training articles held out for train_holdout


def validate_config(config) -> None:
  s = config.squad
  if str(s.version) not in ("1.1", "2.0"):
    raise ValueError(f"invalid config: config.squad.version={s.version!r}; use '1.1' or '2.0'")
  if s.threshold_from not in ("eval", "train_holdout"):
    raise ValueError(f"invalid config: config.squad.threshold_from={s.threshold_from!r}; use 'eval' or "
                     f"'train_holdout'")
  for key in ("eval_fraction", "threshold_holdout_fraction"):
    if not 0.0 < s[key] < 1.0:
      raise ValueError(f"invalid config: config.squad.{key}={s[key]} must be in (0, 1)")
  for key in ("doc_stride", "max_query_len", "max_answer_length", "n_best"):
    if not isinstance(s[key], int) or s[key] <= 0:
      raise ValueError(f"invalid config: config.squad.{key}={s[key]!r} must be a positive integer")


class SquadTask(Task):
  """SQuAD v1.1 (`version='1.1'`) or v2.0 for `spanlm.finetune`.

  Files come from config.data.train_file / config.data.eval_file; with
  config.squad.split_by_article, both splits come from one file (the train
  file, or the eval file if no train file is given), split by `split_articles`.
  """

  name = "squad"
  metric = "f1"
  splits = ("train", "dev", "threshold_holdout")

  def __init__(self, config):
    super().__init__(config)
    s = config.squad
    self.version = str(s.version)
    self.v2 = self.version.startswith("2")
    self.name = f"squad_v{self.version}"
    self.doc_stride = int(s.doc_stride)
    self.max_query_len = int(s.max_query_len)
    self.max_answer_length = int(s.max_answer_length)
    self.n_best = int(s.n_best)
    self.split_by_article = bool(s.split_by_article)
    self.eval_fraction = float(s.eval_fraction)
    self.max_eval_examples = int(s.max_eval_examples)
    self.holdout = self.v2 and s.threshold_from == "train_holdout"
    self.holdout_fraction = float(s.threshold_holdout_fraction)

  def calibration_split(self) -> str | None:
    return "threshold_holdout" if self.holdout else None

  def _file(self, split):
    data = self.config.data
    train_file, eval_file = data.train_file, data.eval_file
    split = "train" if split == "threshold_holdout" else split
    if self.split_by_article:
      path = train_file or eval_file
      if not path:
        raise ValueError("config.data.train_file (or eval_file) must name a SQuAD JSON file")
      return path, ("train" if split == "train" else "eval")
    path = train_file if split == "train" else eval_file
    if not path:
      raise ValueError(f"config.data.{'train_file' if split == 'train' else 'eval_file'} is empty: "
                       f"name a SQuAD JSON file, or set config.squad.split_by_article=True")
    return path, None

  def load(self, split: str, tokenizer, seq_len: int) -> Features:
    if split not in self.splits:
      raise ValueError(f"SQuAD has splits {self.splits}, not {split!r}")
    path, part = self._file(split)
    report = collections.Counter()
    raw = read_squad_json(path)
    if part is not None:
      raw = split_articles(raw, part, self.eval_fraction)
    if split in ("train", "threshold_holdout") and self.holdout:  # held-out training articles
      raw = split_articles(raw, "train" if split == "train" else "eval", self.holdout_fraction)
    examples = parse_squad(raw, report)
    if split != "train" and self.max_eval_examples:
      report["eval_examples_capped_from"] = len(examples)
      examples = examples[:self.max_eval_examples]
      kept = {e.qid for e in examples}
      raw = _restrict(raw, kept)
    report["articles"] = len(raw["data"])
    features = featurize(examples, tokenizer, seq_len, self.doc_stride, self.max_query_len,
                         training=split == "train", report=report, name=f"SQuAD {split}")
    features.meta["dataset"] = raw
    return features

  def build_model(self, encoder_cfg: BertConfig) -> nn.Module:
    return BertForQuestionAnswering(encoder_cfg)

  def loss(self, outputs, batch):
    return masked_sum(span_loss(outputs, batch), batch)

  def predict(self, outputs, features):
    return decode(np.asarray(outputs["start_logits"]), np.asarray(outputs["end_logits"]), features,
                  self.max_answer_length, self.n_best)

  def evaluate(self, predictions, features, calibration=None) -> dict[str, float]:
    dataset = features.meta["dataset"]
    if len(predictions) < len(features.meta["examples"]):  # rows were capped: score what was predicted
      dataset = _restrict(dataset, set(predictions))
    if not self.v2:
      result = squad_metrics.evaluate(dataset, answers_at_threshold(predictions, None), v2=False)
      return {"exact_match": result["exact_match"], "f1": result["f1"]}
    odds = {q: d["null_odds"] for q, d in predictions.items()}
    result = squad_metrics.evaluate(dataset, {q: d["text"] for q, d in predictions.items()},
                                    na_probs=odds, na_threshold=0.0, v2=True)
    # The threshold is tuned on this split (as BERT does on dev), or on held-out training
    # questions (`calibration`), and belongs to this evaluation: it is returned with its
    # metrics, and write_predictions takes it from the best one.
    threshold = float(result["best_f1_thresh"])
    if calibration is not None:
      cal_predictions, cal_features = calibration
      cal = squad_metrics.evaluate(cal_features.meta["dataset"],
                                   {q: d["text"] for q, d in cal_predictions.items()},
                                   na_probs={q: d["null_odds"] for q, d in cal_predictions.items()},
                                   na_threshold=0.0, v2=True)
      threshold = float(cal["best_f1_thresh"])
    tuned = squad_metrics.evaluate(dataset, answers_at_threshold(predictions, threshold), v2=True)
    out = {"exact_match": tuned["exact_match"], "f1": tuned["f1"], "null_threshold": threshold,
           "exact_match_at_0": result["exact_match"], "f1_at_0": result["f1"]}
    out.update({k: float(v) for k, v in tuned.items() if k.startswith(("HasAns", "NoAns"))})
    return out

  def write_predictions(self, predictions, features, path_prefix: str, best: dict | None = None) -> list[str]:
    """PREFIX.json {qid: answer} (v2.0: "" where the null odds exceed `best['null_threshold']`, the
    threshold tuned in the evaluation the params come from; 0 if there was none),
    PREFIX_nbest.json, PREFIX_gold.json (the SQuAD-format questions predicted, for
    tools/squad_eval.py) and, for v2.0, PREFIX_null_odds.json."""
    threshold = float((best or {}).get("null_threshold", 0.0)) if self.v2 else None
    dataset = features.meta["dataset"]
    if len(predictions) < len(features.meta["examples"]):
      dataset = _restrict(dataset, set(predictions))
    files = {"": answers_at_threshold(predictions, threshold),
             "_nbest": {q: [{"text": t, "score": s} for t, s in d["nbest"]] for q, d in predictions.items()},
             "_gold": dataset}
    if self.v2:
      files["_null_odds"] = {q: d["null_odds"] for q, d in predictions.items()}
    prefix = paths.path(path_prefix)  # a local path or a gs:// URL
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, obj in files.items():
      out = prefix.parent / f"{prefix.name}{suffix}.json"
      out.write_text(json.dumps(obj))
      written.append(str(out))
    return written


def _restrict(dataset: dict, qids: set[str]) -> dict:
  """The dataset with only questions in `qids` (for capped evaluations scored by the official rules)."""
  data = []
  for art in dataset["data"]:
    if not isinstance(art, dict) or not isinstance(art.get("paragraphs"), list):
      continue
    paras = [{**p, "qas": [qa for qa in p["qas"] if isinstance(qa, dict) and qa.get("id") in qids]}
             for p in art["paragraphs"] if isinstance(p, dict) and isinstance(p.get("qas"), list)]
    paras = [p for p in paras if p["qas"]]
    if paras:
      data.append({**art, "paragraphs": paras})
  return {**dataset, "data": data}


def make_task(config) -> SquadTask:
  """`config.task.name='squad'`; the version comes from config.squad.version ('1.1' or '2.0')."""
  if "squad" not in config:
    raise ValueError("config.squad is missing: build the config with finetune_config('squad') "
                     "(experiments/squad.py does)")
  validate_config(config)
  return SquadTask(config)
