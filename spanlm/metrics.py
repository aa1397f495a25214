"""Where metrics go: `workdir/metrics.jsonl` and TensorBoard event files.

The TensorBoard writer encodes the two protobuf messages it needs (Event and
Summary.Value with a simple_value) by hand and frames them as TFRecords with
masked CRC32C, so runs can be watched in TensorBoard without TensorFlow.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import socket
import struct
import time

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


def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # length-delimited field
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, wall_time: float, *, file_version: str = "", scalars=None) -> bytes:
  msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version:
    msg += _field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _field(1, _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
        for tag, value in scalars.items())
    msg += _field(5, values)
  return msg


def _record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


class TensorBoardWriter:
  """Scalar summaries in TensorBoard's event-file format."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self._file = open(os.path.join(logdir, name), "ab")
    self._file.write(_record(_event(0, time.time(), file_version="brain.Event:2")))

  def scalars(self, step: int, values: dict[str, float]):
    finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
    self._file.write(_record(_event(step, time.time(), scalars=finite)))
    self._file.flush()

  def close(self):
    self._file.close()


class MetricsWriter:
  """One JSON object per logged step in metrics.jsonl, mirrored to TensorBoard.

  Only process 0 writes, so multi-host runs produce one log.
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = TensorBoardWriter(os.path.join(workdir, "tensorboard"))

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


# Ids never chosen for prediction (spanlm.masking.special_mask): [PAD], [CLS], [SEP].
_NEVER_PREDICTED = (0, 2, 3)


def unigram_neg_log_probs(rows, vocab_size: int, chunk: int = 4096) -> np.ndarray:
  """-log p(v) of the add-one-smoothed unigram model of the (training) rows.

  p(v) = (c_v + 1) / (N + V'), with c_v the count of id v among the rows' tokens that can be
  predicted (all but [PAD]/[CLS]/[SEP]), N their total and V' the number of such ids. The
  held-out masked-LM loss of a model that ignores context cannot, in expectation, beat the
  mean of this table over the held-out masked targets: the *unigram baseline* printed beside
  every eval line. `rows`: a random-access split (e.g. `PreparedDataset.train`).
  """
  counts = np.zeros(vocab_size, np.int64)
  for start in range(0, len(rows), chunk):
    index = list(range(start, min(start + chunk, len(rows))))
    batch = rows.__getitems__(index) if hasattr(rows, "__getitems__") else [rows[i] for i in index]
    ids = np.concatenate([np.asarray(r["input_ids"]).ravel() for r in batch])
    counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
  counts[list(_NEVER_PREDICTED)] = 0
  predictable = np.ones(vocab_size, bool)
  predictable[list(_NEVER_PREDICTED)] = False
  probs = np.where(predictable, counts + 1.0, 0.0) / (counts.sum() + predictable.sum())
  with np.errstate(divide="ignore"):
    return (-np.log(probs)).astype(np.float32)  # inf at ids that are never targets
