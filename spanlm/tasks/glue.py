"""GLUE (Wang et al. 2019): sentence and sentence-pair classification and regression.

Input: [CLS] a [SEP] (b [SEP]), segment 0 for a and its [SEP], 1 for b; pairs
longer than the budget are truncated longest-first, one token at a time, as in
BERT's `_truncate_seq_pair` (counted). The head is BERT's: dropout on the pooled
[CLS] vector h = tanh(W_p x_[CLS] + b_p), then logits = W h + b; cross-entropy
for classification, squared error for STS-B's similarity score.

Official metrics (from the GLUE paper and its evaluation server):
  accuracy                      SST-2, MNLI, QNLI, RTE, WNLI (and MRPC, QQP)
  F1 of the positive class      MRPC, QQP:  F1 = 2 TP / (2 TP + FP + FN)
  Matthews correlation          CoLA: (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
  Pearson / Spearman corr.      STS-B: r = cov(x, y) / (σx σy); Spearman = Pearson of the ranks
                                (ties get their average rank)

Files are GLUE's TSVs (https://gluebenchmark.com/tasks), read as plain
tab-separated lines (no quoting: MRPC and SST-2 text contains bare quotes). Rows
with the wrong number of columns or an unknown/non-numeric label are counted and
skipped. Test predictions are written in the GLUE submission format
(`<TASK>.tsv` with columns index, prediction; the index is the test file's own
`index` or `id` column, so a skipped row never shifts the others). MNLI's model
also predicts the mismatched test set (`MNLI-mm.tsv`) and the diagnostic set
AX (`AX.tsv`, from GLUE's diagnostic/diagnostic.tsv), as the GLUE server expects;
`tools/glue_submission.py` zips the eleven files.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from spanlm import paths
from spanlm.models.bert import BertConfig, BertEncoder
from spanlm.tasks.base import Features, Task, masked_sum


@dataclasses.dataclass(frozen=True)
class GlueSpec:
  directory: str  # GLUE's directory name
  submission: str  # file name stem of the GLUE submission file for the test split
  text: tuple  # column names (or indices for headerless files) of sentence a [and b]
  label: str | int  # label column
  labels: tuple = ("0", "1")  # label strings in class-id order; () = regression
  metric: str = "accuracy"
  header: bool = True  # train/dev files have a header row (CoLA's do not)
  files: tuple = (("train", "train.tsv"), ("dev", "dev.tsv"), ("test", "test.tsv"))
  extra_submissions: tuple = ()  # (split, stem) of other unlabelled splits the server expects

  @property
  def regression(self) -> bool:
    return not self.labels


_NLI = ("entailment", "not_entailment")
TASKS = {
    "cola": GlueSpec("CoLA", "CoLA", (3,), 1, metric="matthews_corr", header=False),
    "sst2": GlueSpec("SST-2", "SST-2", ("sentence",), "label"),
    "mrpc": GlueSpec("MRPC", "MRPC", ("#1 String", "#2 String"), "Quality", metric="f1"),
    "qqp": GlueSpec("QQP", "QQP", ("question1", "question2"), "is_duplicate", metric="f1"),
    "stsb": GlueSpec("STS-B", "STS-B", ("sentence1", "sentence2"), "score", labels=(), metric="pearson"),
    "mnli": GlueSpec("MNLI", "MNLI-m", ("sentence1", "sentence2"), "gold_label",
                     labels=("contradiction", "entailment", "neutral"),
                     files=(("train", "train.tsv"), ("dev", "dev_matched.tsv"), ("test", "test_matched.tsv"),
                            ("dev_mismatched", "dev_mismatched.tsv"),
                            ("test_mismatched", "test_mismatched.tsv"),
                            ("ax", os.path.join("..", "diagnostic", "diagnostic.tsv"))),
                     extra_submissions=(("test_mismatched", "MNLI-mm"), ("ax", "AX"))),
    "qnli": GlueSpec("QNLI", "QNLI", ("question", "sentence"), "label", labels=_NLI),
    "rte": GlueSpec("RTE", "RTE", ("sentence1", "sentence2"), "label", labels=_NLI),
    "wnli": GlueSpec("WNLI", "WNLI", ("sentence1", "sentence2"), "label"),
}


# --- official metrics, in NumPy ------------------------------------------------------------------
def accuracy(pred, gold) -> float:
  return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1_score(pred, gold) -> float:
  """F1 of class 1; 0 when there are no true positives."""
  pred, gold = np.asarray(pred) == 1, np.asarray(gold) == 1
  tp = np.sum(pred & gold)
  denom = 2 * tp + np.sum(pred & ~gold) + np.sum(~pred & gold)
  return float(2 * tp / denom) if tp else 0.0


def matthews_corr(pred, gold) -> float:
  """Binary Matthews correlation; 0 when a marginal is empty (sklearn's convention)."""
  pred, gold = np.asarray(pred) == 1, np.asarray(gold) == 1
  tp, tn = float(np.sum(pred & gold)), float(np.sum(~pred & ~gold))
  fp, fn = float(np.sum(pred & ~gold)), float(np.sum(~pred & gold))
  denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denom) if denom else 0.0


def spearman(x, y) -> float:
  """Pearson of the ranks, ties sharing their average rank (scipy.stats.rankdata)."""
  from scipy import stats
  return pearson(stats.rankdata(x), stats.rankdata(y))


def glue_metrics(spec: GlueSpec, pred, gold) -> dict[str, float]:
  if spec.regression:
    return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold)}
  out = {"accuracy": accuracy(pred, gold)}
  if spec.metric == "f1":
    out["f1"] = f1_score(pred, gold)
  if spec.metric == "matthews_corr":
    out["matthews_corr"] = matthews_corr(pred, gold)
  return out


# --- reading and encoding ------------------------------------------------------------------------
def read_tsv(path: str, spec: GlueSpec, labelled: bool, report: dict) -> list[dict]:
  """Rows as {'texts': [...], 'label': str|None, 'index': str}; bad rows counted in `report`.
  `path` is local or gs://."""
  raw = paths.read_bytes(path)
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise ValueError(f"{path} line {line}: byte 0x{raw[e.start]:02X} is not UTF-8; GLUE files are UTF-8 "
                     f"(re-download the file or convert it, e.g. iconv -f latin1 -t utf-8)") from None
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  # Test files always have a header (index, text columns); CoLA's train/dev do not.
  has_header = spec.header or not labelled
  header = lines[0].rstrip("\r").split("\t") if has_header else None
  body = lines[1:] if has_header else lines

  def col(name):
    if isinstance(name, int):
      return name if header is None else {3: header.index("sentence")}.get(name, name)  # CoLA test
    if name not in header:
      raise ValueError(f"{path}: header has no column {name!r} (columns: {header}); is this the "
                       f"right GLUE task directory?")
    return header.index(name)

  text_cols = [col(c) for c in spec.text]
  label_col = col(spec.label) if labelled else None
  # The test files' own id column (QQP's is `id`), so a skipped row shifts no other id.
  index_col = next((header.index(c) for c in ("index", "id") if header and c in header), None)
  width = len(header) if header else None
  rows = []
  for n, line in enumerate(body):
    fields = line.rstrip("\r").split("\t")
    if width is None:
      width = len(fields)  # headerless: the first row sets the column count
    if len(fields) != width:
      report["skipped_malformed"] = report.get("skipped_malformed", 0) + 1
      if report["skipped_malformed"] <= 3:
        logging.warning("%s line %d: %d columns, expected %d; skipped", path, n + 1 + has_header,
                        len(fields), width)
      continue
    label = None
    if labelled:
      label = fields[label_col].strip()
      ok = _is_number(label) if spec.regression else label in spec.labels
      if not ok:
        report["skipped_bad_label"] = report.get("skipped_bad_label", 0) + 1
        if report["skipped_bad_label"] <= 3:
          logging.warning("%s line %d: label %r is not %s; skipped", path, n + 1 + has_header, label,
                          "a number" if spec.regression else f"one of {spec.labels}")
        continue
    rows.append({"texts": [fields[c] for c in text_cols], "label": label,
                 "index": fields[index_col] if index_col is not None else str(n)})
  return rows


def _is_number(s: str) -> bool:
  try:
    return np.isfinite(float(s))
  except ValueError:
    return False


def pack(tokenizer, a: list[int], b: list[int] | None, seq_len: int):
  """[CLS] a [SEP] (b [SEP]) padded to seq_len: (ids, segments, mask, truncated?)."""
  budget = seq_len - (3 if b is not None else 2)
  a, b = list(a), (list(b) if b is not None else None)
  truncated = len(a) + (len(b) if b is not None else 0) > budget
  if b is None:
    a = a[:budget]
  else:
    while len(a) + len(b) > budget:  # longest-first, as BERT's _truncate_seq_pair
      (a if len(a) > len(b) else b).pop()
  ids = [tokenizer.cls_id] + a + [tokenizer.sep_id]
  seg = [0] * len(ids)
  if b is not None:
    ids += b + [tokenizer.sep_id]
    seg += [1] * (len(b) + 1)
  pad = seq_len - len(ids)
  return (ids + [tokenizer.pad_id] * pad, seg + [0] * pad, [1] * len(ids) + [0] * pad, truncated)


class GlueClassifier(nn.Module):
  """BERT + dropout + linear over the pooled [CLS] (Devlin et al. 2019, §4.1)."""

  cfg: BertConfig
  num_outputs: int

  def setup(self):
    self.encoder = BertEncoder(self.cfg)
    self.dropout = nn.Dropout(self.cfg.dropout_rate)
    self.classifier = nn.Dense(self.num_outputs, kernel_init=nn.initializers.normal(self.cfg.initializer_range),
                               name="classifier")

  def __call__(self, batch, deterministic: bool = True):
    _, pooled = self.encoder(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                             deterministic=deterministic)
    logits = self.classifier(self.dropout(pooled, deterministic=deterministic).astype(jnp.float32))
    return {"logits": logits}


class GlueTask(Task):

  def __init__(self, key: str, config):
    super().__init__(config)
    self.spec = TASKS[key]
    self.name = key
    self.metric = "pearson" if self.spec.regression else self.spec.metric
    self.splits = tuple(s for s, _ in self.spec.files)

  def data_dir(self) -> str:
    d = self.config.task.data_dir or os.path.join(os.environ.get("GLUE_DIR", "glue_data"), self.spec.directory)
    if not paths.is_dir(d):  # local or gs://
      raise FileNotFoundError(f"GLUE {self.spec.directory} directory {d!r} not found; pass "
                              f"--config.task.data_dir=PATH/{self.spec.directory} or set GLUE_DIR")
    return d

  length_keys = ("input_ids", "segment_ids", "attention_mask")

  def has_labels(self, split: str) -> bool:
    return not split.startswith("test") and split != "ax"

  def predict_splits(self) -> tuple[str, ...]:
    split = self.config.task.predict_split
    if split == "test":  # every file the GLUE server expects from this task's model
      return ("test",) + tuple(s for s, _ in self.spec.extra_submissions)
    return (split,) if split else ()

  def prediction_dir(self, split: str) -> str:
    return "predictions_test" if split == "test" or dict(self.spec.extra_submissions).get(split) \
        else f"predictions_{split}"

  def submission_stem(self, split: str) -> str:
    return dict(self.spec.extra_submissions).get(split) or (self.spec.submission if split == "test" else
                                                            f"{self.spec.submission}_{split}")

  def load(self, split: str, tokenizer, seq_len: int) -> Features:
    files = dict(self.spec.files)
    if split not in files:
      raise ValueError(f"GLUE {self.name} has no split {split!r}; choose one of {sorted(files)}")
    path = os.path.join(self.data_dir(), files[split])
    if not paths.is_file(path):
      raise FileNotFoundError(f"{path} not found")
    report: dict[str, int] = {}
    labelled = self.has_labels(split)
    rows = read_tsv(path, self.spec, labelled, report)
    oov_before = tokenizer.num_oov_ids
    n, L = len(rows), seq_len
    ids, seg, mask = (np.zeros((n, L), np.int32) for _ in range(3))
    truncated = 0
    for i, row in enumerate(rows):
      enc = [tokenizer.encode(t) for t in row["texts"]]
      ids[i], seg[i], mask[i], cut = pack(tokenizer, enc[0], enc[1] if len(enc) > 1 else None, L)
      truncated += cut
    arrays = {"input_ids": ids, "segment_ids": seg, "attention_mask": mask}
    if labelled:
      arrays["labels"] = (np.array([float(r["label"]) for r in rows], np.float32) if self.spec.regression
                          else np.array([self.spec.labels.index(r["label"]) for r in rows], np.int32))
    report = {"rows": n, "skipped_malformed": report.get("skipped_malformed", 0),
              "skipped_bad_label": report.get("skipped_bad_label", 0), "truncated": truncated}
    if tokenizer.num_oov_ids > oov_before:
      report["unk_out_of_vocab_ids"] = tokenizer.num_oov_ids - oov_before
    return Features(arrays, meta={"index": [r["index"] for r in rows], "split": split}, report=report)

  def build_model(self, encoder_cfg: BertConfig) -> nn.Module:
    cfg = dataclasses.replace(encoder_cfg, use_pooler=True)
    return GlueClassifier(cfg, 1 if self.spec.regression else len(self.spec.labels))

  def loss(self, outputs, batch):
    logits = outputs["logits"]
    if self.spec.regression:
      per_example = jnp.square(logits[:, 0] - batch["labels"])
    else:
      logp = jax.nn.log_softmax(logits)
      per_example = -jnp.take_along_axis(logp, batch["labels"][:, None], axis=-1)[:, 0]
    return masked_sum(per_example, batch)

  def predict(self, outputs, features):
    logits = outputs["logits"]
    return logits[:, 0] if self.spec.regression else np.argmax(logits, axis=-1)

  def evaluate(self, predictions, features, calibration=None):
    return glue_metrics(self.spec, predictions, features.arrays["labels"])

  def write_predictions(self, predictions, features, path_prefix, best=None):
    folder = paths.path(path_prefix)  # a local folder or a gs:// URL
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["index\tprediction"]
    for index, p in zip(features.meta["index"], predictions):
      value = f"{float(np.clip(p, 0.0, 5.0)):.3f}" if self.spec.regression else self.spec.labels[int(p)]
      lines.append(f"{index}\t{value}")
    out = folder / f"{self.submission_stem(features.meta['split'])}.tsv"
    out.write_text("\n".join(lines) + "\n")
    return [str(out)]


def make_task(key: str, config) -> GlueTask:
  return GlueTask(key, config)
