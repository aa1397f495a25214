"""Losses on cases whose answers can be worked out by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from spanlm.objectives.masking import MaskedBatch
from spanlm.objectives.losses import select_predictions, summarize, total_loss, weighted_cross_entropy


def test_uniform_logits_cost_log_vocab():
  logits = jnp.zeros((2, 3, 10))
  targets = jnp.array([[1, 2, 3], [4, 5, 6]])
  weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  loss, correct = weighted_cross_entropy(logits, targets, weights)
  assert float(loss) == pytest.approx(3 * np.log(10), rel=1e-6)


def test_two_class_case_and_accuracy():
  # log-softmax of [log 3, 0] at class 0 is log(3/4); at class 1 it is log(1/4).
  logits = jnp.array([[[np.log(3.0), 0.0], [np.log(3.0), 0.0]]])
  loss, correct = weighted_cross_entropy(logits, jnp.array([[0, 1]]), jnp.array([[1.0, 2.0]]))
  assert float(loss) == pytest.approx(-np.log(0.75) - 2 * np.log(0.25), rel=1e-6)
  assert float(correct) == pytest.approx(1.0)


def test_vocabulary_padding_is_excluded_from_the_softmax():
  logits = jnp.zeros((1, 1, 8))
  loss, _ = weighted_cross_entropy(logits, jnp.array([[0]]), jnp.ones((1, 1)), num_classes=5)
  assert float(loss) == pytest.approx(np.log(5), rel=1e-6)


def test_select_predictions_gathers_masked_positions_in_order():
  w = np.zeros((2, 8), np.float32)
  w[0, [2, 5, 6]] = 1
  w[1, [7]] = 1
  ids = np.arange(16, dtype=np.int32).reshape(2, 8) + 10
  left = np.arange(16, dtype=np.int32).reshape(2, 8) - 1
  mb = MaskedBatch(jnp.asarray(ids), jnp.asarray(ids), jnp.asarray(w), jnp.asarray(left), jnp.asarray(left + 2),
                   jnp.where(jnp.asarray(w) > 0, 0, -1))
  p = select_predictions(mb, 4)
  np.testing.assert_array_equal(p.positions[0, :3], [2, 5, 6])
  np.testing.assert_array_equal(p.weights, [[1, 1, 1, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(p.positions[1, 0], 7)
  np.testing.assert_array_equal(p.targets[0, :3], ids[0, [2, 5, 6]])
  np.testing.assert_array_equal(p.left[0, :3], [1, 4, 5])


def test_total_loss_is_mlm_plus_weighted_sbo_per_token():
  sums = {"num_predictions": 4.0, "mlm_loss": 8.0, "mlm_correct": 1.0, "sbo_loss": 12.0, "sbo_correct": 2.0}
  assert float(total_loss(sums, 0.5)) == 14.0
  out = summarize(sums, 0.5)
  assert out["loss"] == 3.5 and out["mlm_loss"] == 2.0 and out["sbo_loss"] == 3.0
  assert out["mlm_accuracy"] == 0.25 and out["sbo_accuracy"] == 0.5
