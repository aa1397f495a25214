"""Losses on cases whose answers can be worked out by hand."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanlm.models.bert import config_for
from spanlm.models.heads import BertForPretraining
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


def test_total_loss_normalises_mlm_and_sbo_by_their_own_counts():
  """SpanBERT's span_bert_loss: lm_loss / ntokens + pair_loss_weight * pair_loss / npairs."""
  sums = {"num_predictions": 4.0, "mlm_loss": 8.0, "mlm_correct": 1.0, "sbo_loss": 12.0, "sbo_correct": 2.0,
          "num_sbo_targets": 3.0}
  assert float(total_loss(sums, 0.5)) == 2.0 + 0.5 * 4.0
  out = summarize(sums, 0.5)
  assert out["loss"] == 4.0 and out["mlm_loss"] == 2.0 and out["sbo_loss"] == 4.0
  assert out["mlm_accuracy"] == 0.25 and out["sbo_accuracy"] == pytest.approx(2 / 3)


def _gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _layer_norm(x, p, eps=1e-12):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def pair_target_reference(hidden, pairs, head, table, bias, max_targets):
  """SpanBERT's BertPairTargetPredictionHead.forward (pretraining/fairseq/models/pair_bert.py),
  in NumPy: for each pair (left, right) of each row, scores for ALL `max_targets` target slots,
  [bs, num_pairs, max_targets, V]. MLPWithLayerNorm = LN(gelu(W2 LN(gelu(W1 x))))."""
  bs, num_pairs, _ = pairs.shape
  out = np.zeros((bs, num_pairs, max_targets, table.shape[0]))
  for b in range(bs):
    for k in range(num_pairs):
      left_h, right_h = hidden[b, pairs[b, k, 0]], hidden[b, pairs[b, k, 1]]
      for j in range(max_targets):
        x = np.concatenate([left_h, right_h, head["position_embeddings"][j]])
        x = _layer_norm(_gelu(x @ head["dense_0"]["kernel"] + head["dense_0"]["bias"]), head["norm_0"])
        x = _layer_norm(_gelu(x @ head["dense_1"]["kernel"] + head["dense_1"]["bias"]), head["norm_1"])
        out[b, k, j] = x @ table.T + bias
  return out


@pytest.mark.slow
def test_sbo_head_matches_spanbert_pair_target_head():
  """spanlm scores each target token at its own position; SpanBERT scores every slot of every
  (left, right) pair. Token i of a span starting at s is slot i - s of that pair."""
  V, H, T = 50, 16, 4
  cfg = config_for("tiny", V, num_layers=1, hidden_size=H, num_heads=2, intermediate_size=32,
                   max_position_embeddings=16)
  model = BertForPretraining(cfg, sbo=True, sbo_max_targets=T, sbo_position_size=200)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(5, V, (2, 12)), jnp.int32)
  # Row 0: span [3, 5] (pair (2, 6)); row 1: span [1, 4] (pair (0, 5)) and token 8 (pair (7, 9)).
  positions = jnp.array([[3, 4, 5, 0], [1, 2, 3, 8]])
  left = jnp.array([[2, 2, 2, 0], [0, 0, 0, 7]])
  right = jnp.array([[6, 6, 6, 0], [5, 5, 5, 9]])
  args = (ids, jnp.zeros_like(ids), jnp.ones_like(ids), positions, left, right)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *args)["params"])
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
  assert params["sbo_head"]["position_embeddings"].shape == (T, 200)
  out = jax.jit(model.apply)({"params": params}, *args)
  hidden = np.asarray(jax.jit(lambda p: model.apply(p, *args, method=lambda m, i, s, a, *_: m.encoder(i, s, a)))(
      {"params": params}))
  p = jax.tree.map(np.asarray, params)
  table = p["encoder"]["embeddings"]["word_embeddings"]
  pairs = np.array([[[2, 6], [2, 6]], [[0, 5], [7, 9]]])
  ref = pair_target_reference(hidden, pairs, p["sbo_head"], table, p["sbo_bias"], T)
  got = np.asarray(out["sbo_logits"])
  want = np.stack([np.stack([ref[0, 0, 0], ref[0, 0, 1], ref[0, 0, 2]]),
                   np.stack([ref[1, 0, 0], ref[1, 0, 1], ref[1, 0, 2]])])
  np.testing.assert_allclose(got[:, :3], want, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(got[1, 3], ref[1, 1, 0], atol=2e-4, rtol=1e-4)


def test_recipes_follow_their_reference_commands():
  """The values docs/fidelity.md lists for each recipe (the papers' commands and released code)."""
  import os

  from spanlm import configs

  load = lambda spec: configs.load(os.path.join(os.path.dirname(__file__), "..", "experiments", spec))
  s = load("span_bert.py")
  assert (s.masking.scheme, s.masking.replacement, s.objective.sbo) == ("span", "unigram", True)
  assert (s.objective.sbo_max_targets, s.objective.sbo_position_size, s.objective.sbo_weight) == (15, 200, 1.0)
  assert (s.optimizer.eps, s.optimizer.weight_decay, s.optimizer.grad_clip) == (1e-8, 0.01, 1.0)
  a = load("albert.py")
  assert (a.masking.scheme, a.masking.max_predictions, a.masking.replacement) == ("ngram", 20, "uniform")
  e = load("electra.py")
  assert (e.masking.mask_prob, e.masking.random_prob) == (0.85, 0.0)
  d = load("distill.py")
  assert (d.distill.soft_targets, d.distill.init_from_teacher, d.masking.smoothing) == ("all", True, 0.7)
  assert (d.distill.soft_weight, d.distill.hard_weight, d.distill.cosine_weight) == (5.0, 2.0, 1.0)
  t = load("distill.py:tinybert")
  assert (t.distill.hidden_weight, t.distill.attention_weight, t.distill.soft_weight) == (1.0, 1.0, 0.0)
  b = load("bert.py")
  assert (b.masking.scheme, b.masking.replacement or "uniform") == ("token", "uniform")
