"""Optimizers against NumPy re-implementations of the authors' released code."""

import jax
import jax.numpy as jnp
import numpy as np

from spanlm.configs import base_config
from spanlm.optim import make_optimizer


def bert_adam_weight_decay(params, grads_seq, lr, wd, b1=0.9, b2=0.999, eps=1e-6):
  """google-research/bert optimization.py AdamWeightDecayOptimizer.apply_gradients, in NumPy:
  m, v with no bias correction; update = m / (sqrt(v) + eps) + wd * param except for
  LayerNorm and bias; param -= lr * update."""
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  p = {k: x.astype(np.float64) for k, x in params.items()}
  for grads in grads_seq:
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * grads[k]
      v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
      update = m[k] / (np.sqrt(v[k]) + eps)
      if not any(s in k for s in ("LayerNorm", "bias")):
        update = update + wd * p[k]
      p[k] = p[k] - lr * update
  return p


def test_adamw_without_bias_correction_is_berts_optimizer():
  c = base_config()
  c.optimizer.name, c.optimizer.bias_correction, c.optimizer.grad_clip = "adamw", False, 0.0
  c.optimizer.learning_rate, c.optimizer.weight_decay = 1e-2, 0.01
  c.schedule.name, c.schedule.warmup_steps = "constant", 0
  tx, _ = make_optimizer(c, 10)
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=(2,))}}
  grads_seq = [{"dense": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=(2,))}} for _ in range(4)]
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p)
  for g in grads_seq:
    updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
  flat = lambda t: {"dense/kernel": t["dense"]["kernel"], "dense/bias": t["dense"]["bias"]}
  want = bert_adam_weight_decay(flat(params), [flat(g) for g in grads_seq], 1e-2, 0.01)
  for k, x in flat(p).items():
    np.testing.assert_allclose(np.asarray(x), want[k], rtol=1e-5, atol=1e-6)


def albert_lamb(params, grads_seq, lr, wd, b1=0.9, b2=0.999, eps=1e-6):
  """google-research/albert lamb_optimizer.py LAMBOptimizer.apply_gradients, in NumPy: moments
  without bias correction, decay and the trust ratio ||w|| / ||update|| skipped for LayerNorm
  and bias (exclude_from_layer_adaptation = exclude_from_weight_decay)."""
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  p = {k: x.astype(np.float64) for k, x in params.items()}
  for grads in grads_seq:
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * grads[k]
      v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
      update = m[k] / (np.sqrt(v[k]) + eps)
      ratio = 1.0
      if not any(s in k for s in ("LayerNorm", "bias")):
        update = update + wd * p[k]
        w_norm, g_norm = np.linalg.norm(p[k]), np.linalg.norm(update)
        ratio = w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
      p[k] = p[k] - ratio * lr * update
  return p


def _run(c, params, grads_seq):
  tx, _ = make_optimizer(c, 10)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p)
  for g in grads_seq:
    updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
  return {"dense/kernel": np.asarray(p["dense"]["kernel"]), "dense/bias": np.asarray(p["dense"]["bias"])}


def test_lamb_without_bias_correction_is_alberts_optimizer():
  c = base_config()
  c.optimizer.name, c.optimizer.bias_correction, c.optimizer.grad_clip = "lamb", False, 0.0
  c.optimizer.learning_rate, c.optimizer.weight_decay = 1e-2, 0.01
  c.schedule.name, c.schedule.warmup_steps = "constant", 0
  rng = np.random.default_rng(1)
  params = {"dense": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=(2,))}}
  grads_seq = [{"dense": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=(2,))}} for _ in range(4)]
  flat = lambda t: {"dense/kernel": t["dense"]["kernel"], "dense/bias": t["dense"]["bias"]}
  want = albert_lamb(flat(params), [flat(g) for g in grads_seq], 1e-2, 0.01)
  for k, x in _run(c, params, grads_seq).items():
    np.testing.assert_allclose(x, want[k], rtol=1e-5, atol=1e-6)
