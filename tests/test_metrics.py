"""metrics.jsonl and TensorBoard event files written without TensorFlow."""

import json
import os

import pytest

from spanlm.metrics import MetricsWriter, crc32c


def test_crc32c_check_value():
  assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C (Castagnoli) check value


def test_event_files_read_back_with_tensorboard(tmp_path):
  event_file_loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
  writer = MetricsWriter(str(tmp_path))
  writer.write(10, {"train/loss": 2.5, "learning_rate": 1e-3})
  writer.write(20, {"train/loss": 2.0, "eval/mlm_accuracy": 0.25})
  writer.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows == [{"step": 10, "train/loss": 2.5, "learning_rate": 1e-3},
                  {"step": 20, "train/loss": 2.0, "eval/mlm_accuracy": 0.25}]
  (name,) = os.listdir(tmp_path / "tensorboard")
  events = list(event_file_loader.LegacyEventFileLoader(str(tmp_path / "tensorboard" / name)).Load())
  assert events[0].file_version == "brain.Event:2"
  scalars = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
  assert scalars == {(10, "train/loss"): 2.5, (10, "learning_rate"): pytest.approx(1e-3),
                     (20, "train/loss"): 2.0, (20, "eval/mlm_accuracy"): 0.25}
