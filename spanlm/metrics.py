"""Where metrics go: `workdir/metrics.jsonl`, TensorBoard event files, a PNG of the curves.

TensorBoard events are written with tensorboardX (the maintained writer MaxText
uses; no TensorFlow). `quiet_library_logs` keeps library INFO lines out of a
run's log, and `unigram_neg_log_probs` is the context-free baseline printed
beside every held-out masked-LM loss.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os

import jax
import numpy as np
from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_OWN_DIRS = (_PACKAGE_DIR + os.sep, os.path.join(os.path.dirname(_PACKAGE_DIR), "tools") + os.sep)


class _OwnInfoOnly(std_logging.Filter):
  """INFO lines from spanlm and its tools only; libraries from WARNING up.

  At the default verbosity, JAX ("Unable to initialize backend 'tpu'" on every CPU run) and Orbax
  (~40 INFO lines per save) would bury the run's own lines; `--verbosity=1` shows everything.
  """

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING or logging.get_verbosity() > logging.INFO
            or record.pathname.startswith(_OWN_DIRS))


def quiet_library_logs() -> None:
  """Install `_OwnInfoOnly` on absl's handler (idempotent); command-line entry points call it."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())


class _EpathWriterFactory:
  """tensorboardX writes gs:// event files through etils.epath (our one path type), not through
  google-cloud-storage, which tensorboardX's own gs:// writer needs and spanlm does not install."""

  def open(self, p):
    from spanlm.paths import open_append
    return open_append(p, binary=True)

  def directory_check(self, p):
    pass  # object storage has no folders


def _register_object_storage() -> None:
  from tensorboardX import record_writer
  record_writer.register_writer_factory("gs", _EpathWriterFactory())


class TensorBoardWriter:
  """Scalar summaries in TensorBoard's event-file format, through tensorboardX (no TensorFlow)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # imported here: only process 0 writes events
    _register_object_storage()
    self._writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

  def scalars(self, step: int, values: dict[str, float]):
    for tag, value in values.items():
      if isinstance(value, (int, float)):
        self._writer.add_scalar(tag, float(value), global_step=int(step))
    self._writer.flush()

  def close(self):
    self._writer.close()


class MetricsWriter:
  """One JSON object per logged step in metrics.jsonl, mirrored to TensorBoard.

  Only process 0 writes, so multi-host runs produce one log.
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      from spanlm.paths import open_append, path
      self._jsonl = open_append(path(workdir) / "metrics.jsonl")
      self._tb = TensorBoardWriter(path(workdir) / "tensorboard")

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    clean = {k: (float(v) if not isinstance(v, str) else v) for k, v in values.items()}
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    self._tb.scalars(step, {k: v for k, v in clean.items() if isinstance(v, float)})

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


# Ids never chosen for prediction (spanlm.objectives.masking.special_mask): [PAD], [CLS], [SEP].
_NEVER_PREDICTED = (0, 2, 3)


def unigram_neg_log_probs(rows, vocab_size: int, chunk: int = 4096, max_rows: int = 65536) -> np.ndarray:
  """-log p(v) of the add-one-smoothed unigram model of the (training) rows.

  p(v) = (c_v + 1) / (N + V'), with c_v the count of id v among the rows' tokens that can be
  predicted (all but [PAD]/[CLS]/[SEP]), N their total and V' the number of such ids. The
  held-out masked-LM loss of a model that ignores context cannot, in expectation, beat the
  mean of this table over the held-out masked targets: the *unigram baseline* printed beside
  every eval line. `rows`: a random-access split (e.g. `PreparedDataset.train`). Past `max_rows`
  rows, the counts come from `max_rows` evenly spaced rows, so start-up stays bounded on a big corpus.
  """
  counts = np.zeros(vocab_size, np.int64)
  picked = (np.arange(len(rows)) if len(rows) <= max_rows
            else np.linspace(0, len(rows) - 1, max_rows).astype(np.int64))
  for start in range(0, len(picked), chunk):
    index = [int(i) for i in picked[start:start + chunk]]
    batch = rows.__getitems__(index) if hasattr(rows, "__getitems__") else [rows[i] for i in index]
    ids = np.concatenate([np.asarray(r["input_ids"]).ravel() for r in batch])
    counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
  counts[list(_NEVER_PREDICTED)] = 0
  predictable = np.ones(vocab_size, bool)
  predictable[list(_NEVER_PREDICTED)] = False
  probs = np.where(predictable, counts + 1.0, 0.0) / (counts.sum() + predictable.sum())
  with np.errstate(divide="ignore"):
    return (-np.log(probs)).astype(np.float32)  # inf at ids that are never targets


def trim_metrics(workdir, step: int) -> None:
  """Drop metrics.jsonl rows written after `step`, the checkpoint a run resumes from, so a resumed
  run never logs a step twice (process 0 only; local or gs://)."""
  from spanlm.paths import path
  if jax.process_index() != 0:
    return
  file = path(workdir) / "metrics.jsonl"
  if not file.exists():
    return
  lines = file.read_text().splitlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line).get("step", 0) <= step:
        keep.append(line + "\n")
    except json.JSONDecodeError:  # a line cut by a crash
      continue
  if len(keep) != len(lines):
    logging.info("metrics.jsonl: dropped %d rows written after step %d", len(lines) - len(keep), step)
    if path(workdir).as_posix().startswith("gs://"):
      file.write_text("".join(keep))
    else:
      tmp = file.with_name("metrics.jsonl.tmp")
      tmp.write_text("".join(keep))
      tmp.replace(file)


def read_metrics(workdir: str) -> list[dict]:
  from spanlm.paths import path
  text = (path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def _tokens_per_step(workdir: str) -> int | None:
  from spanlm.paths import path
  try:
    train = json.loads((path(workdir) / "config.json").read_text())["train"]
    return int(train["batch_size"]) * int(train["seq_len"])
  except (OSError, KeyError, ValueError, TypeError):
    return None


def plot_curves(workdirs: list[str], out: str, labels: list[str] | None = None) -> str | None:
  """Train and held-out MLM loss and accuracy against step and against tokens, runs overlaid, as a PNG.

  Reads each workdir's metrics.jsonl (and config.json for tokens per step). The held-out unigram
  baseline, when logged, is drawn dotted. Returns `out`, or None (one INFO line) without matplotlib.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    logging.info("matplotlib is not installed: no curves PNG (pip install matplotlib)")
    return None
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, workdir in enumerate(workdirs):
    rows = read_metrics(workdir)
    label = labels[i] if labels else os.path.basename(str(workdir).rstrip("/"))
    color = colors[i % len(colors)]
    per_step = _tokens_per_step(workdir)
    for row_axes, metric in ((axes[0], "loss"), (axes[1], "accuracy")):
      for split, style in (("train", "-"), ("eval", "--")):
        key = f"{split}/mlm_{metric}"
        if not any(key in r for r in rows) and metric == "loss":
          key = f"{split}/loss"  # objectives without an MLM loss
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not points:
          continue
        steps, values = map(np.array, zip(*points))
        name = f"{label} {'held-out' if split == 'eval' else 'train'}"
        row_axes[0].plot(steps, values, style, color=color, label=name, marker="o" if split == "eval" else None,
                         markersize=3)
        if per_step:
          row_axes[1].plot(steps * per_step / 1e6, values, style, color=color, label=name,
                           marker="o" if split == "eval" else None, markersize=3)
      baseline = [(r["step"], r["eval/unigram_mlm_loss"]) for r in rows if r.get("eval/unigram_mlm_loss")]
      if metric == "loss" and baseline:
        value = baseline[-1][1]
        for ax in row_axes:
          ax.axhline(value, linestyle=":", color=color, linewidth=1, label=f"{label} unigram baseline (held-out)")
  for row, metric in enumerate(("loss", "accuracy")):
    for col, x in enumerate(("step", "tokens (millions)")):
      ax = axes[row][col]
      ax.set_xlabel(x)
      ax.set_ylabel(f"masked-LM {metric}")
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  from spanlm.paths import write_figure
  return write_figure(fig, out, dpi=110)  # local or gs://
