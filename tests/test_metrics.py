"""metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow), the unigram baseline."""

import json
import os

import pytest

import numpy as np

from spanlm.metrics import MetricsWriter, unigram_neg_log_probs


def test_unigram_baseline_is_the_add_one_unigram_model_by_hand():
  # Rows [CLS] 5 5 6 [SEP] [PAD] and [CLS] 5 7 [SEP] [PAD] [PAD]; vocab 8: predictable ids 1 and 4..7 (V' = 5).
  rows = [{"input_ids": np.array([2, 5, 5, 6, 3, 0])}, {"input_ids": np.array([2, 5, 7, 3, 0, 0])}]
  nll = unigram_neg_log_probs(rows, vocab_size=8, chunk=1)
  n = 5 + 5  # five predictable tokens + add-one over five ids
  np.testing.assert_allclose(nll[[5, 6, 7, 4, 1]], -np.log([4 / n, 2 / n, 2 / n, 1 / n, 1 / n]), rtol=1e-6)
  assert np.all(np.isinf(nll[[0, 2, 3]]))  # [PAD] [CLS] [SEP] are never targets


def test_event_files_read_back_with_tensorboard(tmp_path):
  event_file_loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
  writer = MetricsWriter(str(tmp_path))
  writer.write(10, {"train/loss": 2.5, "learning_rate": 1e-3})
  writer.write(20, {"train/loss": 2.0, "eval/mlm_accuracy": 0.25})
  writer.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows == [{"step": 10, "train/loss": 2.5, "learning_rate": 1e-3},
                  {"step": 20, "train/loss": 2.0, "eval/mlm_accuracy": 0.25}]
  (name,) = [n for n in os.listdir(tmp_path / "tensorboard") if n.startswith("events.out.tfevents")]
  events = list(event_file_loader.LegacyEventFileLoader(str(tmp_path / "tensorboard" / name)).Load())
  assert events[0].file_version == "brain.Event:2"
  scalars = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
  assert scalars == {(10, "train/loss"): 2.5, (10, "learning_rate"): pytest.approx(1e-3),
                     (20, "train/loss"): 2.0, (20, "eval/mlm_accuracy"): 0.25}


@pytest.mark.slow
def test_plot_metrics_overlays_runs(tmp_path):
  """tools/plot_metrics.py: two runs, one PNG; a folder without metrics.jsonl is one error line."""
  import subprocess
  import sys
  for name, scale in (("run_a", 1.0), ("run_b", 0.9)):
    writer = MetricsWriter(str(tmp_path / name))
    for step in (10, 20, 30):
      writer.write(step, {"train/mlm_loss": scale * 8 / step ** 0.2, "train/mlm_accuracy": 0.01 * step})
      writer.write(step, {"eval/mlm_loss": scale * 8.5 / step ** 0.2, "eval/mlm_accuracy": 0.009 * step,
                          "eval/unigram_mlm_loss": 6.3})
    writer.close()
    (tmp_path / name / "config.json").write_text(json.dumps({"train": {"batch_size": 4, "seq_len": 16}}))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda *a: subprocess.run([sys.executable, "tools/plot_metrics.py", *a], cwd=root, capture_output=True,
                                  text=True, timeout=300)
  r = run(str(tmp_path / "run_a"), str(tmp_path / "run_b"), f"--out={tmp_path}/curves.png")
  assert r.returncode == 0, r.stderr[-2000:]
  assert open(tmp_path / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  r = run(str(tmp_path), f"--out={tmp_path}/x.png")
  assert r.returncode == 2 and "has no metrics.jsonl" in r.stderr and not os.path.exists(tmp_path / "x.png")
