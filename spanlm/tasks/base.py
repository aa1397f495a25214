"""The Task interface that `spanlm.finetune` trains and evaluates.

A fine-tuning task (GLUE classification, SQuAD span extraction, BERTSUM
extractive summarisation, ...) is everything that differs between tasks; the
loop in `spanlm/finetune.py` (sharding, AdamW with warmup + linear decay,
dropout, epochs, per-epoch evaluation, best-dev selection, metrics.jsonl,
checkpoints) is shared. A task:

  (a) `load(split, tokenizer, seq_len)` -> `Features`: fixed-shape numpy arrays
      (every array has the same leading dimension N, one row per model input),
      per-row metadata (what `predict` needs to map rows back to examples), and
      a `report` of counted skips/truncations (malformed rows are counted and
      logged, never dropped silently and never a crash);
  (b) `build_model(encoder_cfg)` -> a flax module whose BERT encoder is the
      submodule named `encoder` (so `params['encoder']` can be initialised from
      a pretrained checkpoint); `module.apply({'params': p}, batch,
      deterministic=...)` returns a dict of arrays, each with leading dim B;
  (c) `loss(outputs, batch)` -> (sum of per-example losses, number of examples)
      over the batch's real rows (`batch['example_mask']` is 0 on padding rows
      the loop adds to fill the last eval batch); the loop divides once, so
      gradient accumulation and sharding do not change the mean;
  (d) `predict(outputs, features)` turns the gathered outputs of a whole split
      (numpy, N rows, padding removed) into predictions, and
      `evaluate(predictions, features)` computes the task's official metrics
      ({name: float}; `metric` names the one that picks the best epoch);
  (e) `write_predictions(predictions, features, path_prefix, best)` writes the
      files a leaderboard or evaluation script expects for the best params, `best`
      being the dev metrics of the evaluation they come from (SQuAD v2.0 applies
      the null threshold tuned there); `predict_splits()` names the splits
      predicted (default: config.task.predict_split) and `prediction_dir(split)`
      where their files go under the workdir.
  `length_keys` names the arrays whose second axis is the sequence: a task whose
  outputs have no sequence axis (GLUE) may list them, and the loop then pads each
  batch only to the shortest of a few lengths that holds it (config.finetune.length_buckets;
  config.finetune.group_by_length batches rows of similar length).
  `optimizer(config, num_steps)` may return an optax transformation to replace
  the default (e.g. BERTSUM's separate schedules for the encoder and the new
  layers via `optax.multi_transform`); None means `spanlm.optim.make_optimizer`.

Tokenizers come from `spanlm.data.wordpiece.load_tokenizer` (WordPiece or
SentencePiece behind one interface): special ids are read from the tokenizer
(`tokenizer.cls_id` ...), never from constants, because BERT's vocabulary puts
[CLS] at 101 and spanlm's SentencePiece at 2.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import numpy as np
from absl import logging

from spanlm.models.bert import BertConfig


@dataclasses.dataclass
class Features:
  """One split, ready for the model.

  arrays: name -> np.ndarray with leading dim N (e.g. input_ids/segment_ids/
    attention_mask int32 [N, L], labels [N]). Every array is fed to the model.
  meta: per-row (or per-example) metadata for `predict`/`write_predictions`;
    any Python object (list of dicts, dict of lists ...), never sent to device.
  report: counters, e.g. {'rows': 872, 'skipped_malformed': 0, 'truncated': 3}.
  """

  arrays: dict[str, np.ndarray]
  meta: Any = None
  report: dict[str, int] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values()))) if self.arrays else 0

  def log_report(self, name: str) -> None:
    """Log the counters; a warning when anything was skipped or truncated."""
    text = ", ".join(f"{k}={v}" for k, v in self.report.items())
    bad = any(v for k, v in self.report.items() if k.startswith(("skipped", "truncated", "unk")))
    (logging.warning if bad else logging.info)("%s: %d rows (%s)", name, len(self), text)


class Task:
  """Base class: subclasses override every method that raises."""

  name: str = "task"
  metric: str = "accuracy"  # key of `evaluate`'s dict that selects the best epoch
  higher_is_better: bool = True
  splits: tuple[str, ...] = ("train", "dev", "test")  # names `load` understands
  length_keys: tuple[str, ...] = ()  # arrays [N, L] a batch may be cut to a shorter L (see (e))

  def __init__(self, config):
    self.config = config

  def load(self, split: str, tokenizer, seq_len: int) -> Features:
    raise NotImplementedError(f"{type(self).__name__}.load")

  def has_labels(self, split: str) -> bool:
    """Whether `split` has gold labels (test splits usually do not)."""
    return split != "test"

  def build_model(self, encoder_cfg: BertConfig) -> nn.Module:
    raise NotImplementedError(f"{type(self).__name__}.build_model")

  def loss(self, outputs: dict, batch: dict):
    raise NotImplementedError(f"{type(self).__name__}.loss")

  def predict(self, outputs: dict[str, np.ndarray], features: Features):
    raise NotImplementedError(f"{type(self).__name__}.predict")

  def evaluate(self, predictions, features: Features, calibration=None) -> dict[str, float]:
    """`calibration`: (predictions, features) of `calibration_split()`, when the task has one."""
    raise NotImplementedError(f"{type(self).__name__}.evaluate")

  def calibration_split(self) -> str | None:
    """A split the loop predicts with every evaluation and hands to `evaluate` (e.g. held-out
    training questions that tune SQuAD v2.0's null threshold), or None."""
    return None

  def write_predictions(self, predictions, features: Features, path_prefix: str,
                        best: dict | None = None) -> list[str]:
    """Write prediction file(s); returns their paths. Default: none."""
    return []

  def predict_splits(self) -> tuple[str, ...]:
    """Splits whose predictions the loop writes with the best params."""
    split = self.config.task.get("predict_split", "")
    return (split,) if split else ()

  def prediction_dir(self, split: str) -> str:
    """Where `split`'s predictions go, relative to the workdir (a prefix or a directory)."""
    return f"predictions_{split}"

  def optimizer(self, config, num_steps: int):
    """An optax GradientTransformation to use instead of make_optimizer, or None."""
    return None


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """'NAME: 3200/9815 rows | 85.2 rows/s | ETA 0:01:17', logged at most every `every` seconds."""

  def __init__(self, name: str, total: int, unit: str = "rows", every: float = 10.0):
    self.name, self.total, self.unit, self.every = name, total, unit, every
    self.start = self.last = time.time()
    self.count = 0

  def update(self, count: int) -> None:
    self.count = count
    now = time.time()
    if now - self.last >= self.every and count < self.total:
      self.last = now
      rate = count / max(now - self.start, 1e-9)
      logging.info("%s %d/%d %s | %.1f %s/s | ETA %s", self.name, count, self.total, self.unit, rate,
                   self.unit, format_duration((self.total - count) / max(rate, 1e-9)))

  def done(self) -> None:
    elapsed = time.time() - self.start
    if elapsed >= self.every:  # quick passes stay quiet
      logging.info("%s %d %s in %s (%.1f %s/s)", self.name, self.count, self.unit, format_duration(elapsed),
                   self.count / max(elapsed, 1e-9), self.unit)


def masked_sum(values, batch):
  """(sum over real rows, number of real rows): the (c) contract for per-example losses."""
  import jax.numpy as jnp

  w = batch["example_mask"].astype(jnp.float32)
  return jnp.sum(values * w), jnp.sum(w)
