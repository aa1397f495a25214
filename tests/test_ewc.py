"""EWC (Kirkpatrick et al. 2017): per-example Fisher, the penalty, the train-step hook, and forgetting."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import spanlm
from spanlm import parallel
from spanlm.optim import ewc

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def logistic_nll(params, example):
  x, y = example["x"], example["y"]
  z = x @ params["w"] + params["b"]
  return jnp.logaddexp(0.0, z) - y * z, example["valid"]


def test_fisher_is_mean_of_squared_per_example_gradients():
  rng = np.random.default_rng(0)
  n, d = 40, 5
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (rng.random(n) < 0.5).astype(np.float32)
  valid = np.arange(n) < 33  # the last rows are padding
  params = {"w": jnp.asarray(rng.normal(size=d), jnp.float32), "b": jnp.float32(0.3)}
  batches = [{"x": x[i:i + 8], "y": y[i:i + 8], "valid": valid[i:i + 8]} for i in range(0, n, 8)]
  fisher, count = ewc.diagonal_fisher(logistic_nll, params, batches)
  # Closed form: d nll_n / dw = (sigmoid(z_n) - y_n) x_n, d/db = sigmoid(z_n) - y_n.
  r = 1 / (1 + np.exp(-(x @ np.asarray(params["w"]) + 0.3))) - y
  assert count == 33
  np.testing.assert_allclose(fisher["w"], np.mean((r[:33, None] * x[:33]) ** 2, axis=0), rtol=1e-5)
  np.testing.assert_allclose(fisher["b"], np.mean(r[:33] ** 2), rtol=1e-5)
  # ... which is not the square of the mean gradient (that one vanishes at an optimum).
  assert not np.allclose(fisher["w"], np.mean(r[:33, None] * x[:33], axis=0) ** 2, rtol=0.1)


def test_penalty_value_gradient_and_file_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  shapes = {"dense": {"kernel": (3, 4), "bias": (4,)}, "scale": (2,)}
  mk = lambda: jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                            is_leaf=lambda s: isinstance(s, tuple))
  fisher, theta, params = jax.tree.map(np.abs, mk()), mk(), mk()
  path = str(tmp_path / "ewc" / "fisher.npz")
  ewc.save(path, fisher, theta)
  cfg = ml_collections.ConfigDict({"fisher_path": path, "lambda_": 7.0})
  pen = ewc.make_penalty(cfg, params)
  flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)])
  f, th, p = flat(fisher), flat(theta), flat(params)
  np.testing.assert_allclose(pen(params), 3.5 * np.sum(f * (p - th) ** 2), rtol=1e-5)
  np.testing.assert_allclose(flat(jax.grad(pen)(params)), 7.0 * f * (p - th), rtol=1e-5)
  assert ewc.make_penalty(ml_collections.ConfigDict({"fisher_path": path, "lambda_": 0.0}), params) is None
  assert ewc.make_penalty(ml_collections.ConfigDict({"fisher_path": "", "lambda_": 1.0}), params) is None
  with pytest.raises(ValueError, match="does not match the model"):
    ewc.make_penalty(cfg, {"dense": {"kernel": np.zeros((3, 5)), "bias": np.zeros(4)}, "scale": np.zeros(2)})
  with pytest.raises(FileNotFoundError, match="compute_fisher"):
    ewc.make_penalty(ml_collections.ConfigDict({"fisher_path": path + "x", "lambda_": 1.0}), params)


def test_ewc_forgets_less_on_two_tasks():
  """Logistic regression on two tasks sharing features: EWC keeps task A's loss lower after B."""
  d, n = 12, 400

  def task(active, seed):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, d)).astype(np.float32) * active
    u = r.normal(size=d) * active
    return {"x": x, "y": (x @ u > 0).astype(np.float32), "valid": np.ones(n, bool)}

  a = task(np.r_[np.ones(8), np.zeros(4)], 1)  # A: features 0-7
  b = task(np.r_[np.zeros(4), np.ones(8)], 2)  # B: features 4-11, 4-7 shared
  loss = lambda p, data: jnp.mean(jax.vmap(logistic_nll, in_axes=(None, 0))(p, data)[0])

  def train(params, data, penalty=None, steps=300, lr=0.5):
    objective = (lambda p: loss(p, data) + penalty(p)) if penalty else (lambda p: loss(p, data))
    step = jax.jit(lambda p: jax.tree.map(lambda w, g: w - lr * g, p, jax.grad(objective)(p)))
    for _ in range(steps):
      params = step(params)
    return params

  theta_a = train({"w": jnp.zeros(d), "b": jnp.float32(0.0)}, a)
  fisher, _ = ewc.diagonal_fisher(logistic_nll, theta_a, [a])
  after_a = float(loss(theta_a, a))
  plain = train(theta_a, b)
  with_ewc = train(theta_a, b, lambda p: ewc.penalty(p, fisher, theta_a, 30.0))
  drop_plain, drop_ewc = float(loss(plain, a)) - after_a, float(loss(with_ewc, a)) - after_a
  assert drop_plain > 0.2, drop_plain  # B overwrites the shared features: A is forgotten
  assert drop_ewc < 0.5 * drop_plain, (drop_ewc, drop_plain)
  assert float(loss(with_ewc, b)) < 0.75 * float(loss(theta_a, b))  # ... while B is still learned


# --- the hook in spanlm.train ----------------------------------------------------------------
V, L, B = 1000, 32, 8


def config(accum=1, fisher_path="", lam=0.0):
  c = spanlm.load_config(os.path.join(EXPERIMENTS, "span_bert.py:tiny"))
  c.model.num_layers, c.model.hidden_size, c.model.num_heads, c.model.intermediate_size = 1, 32, 2, 64
  c.train.batch_size, c.train.seq_len, c.train.grad_accum_steps = B, L, accum
  c.optimizer.name, c.optimizer.momentum, c.optimizer.grad_clip = "sgd", 0.0, 0.0
  c.optimizer.learning_rate, c.schedule.name, c.schedule.warmup_steps = 0.1, "constant", 0
  c.ewc.fisher_path, c.ewc.lambda_ = fisher_path, lam
  return c


@pytest.mark.slow
def test_train_step_adds_penalty_once_per_step(tmp_path):
  table = np.zeros(V, bool)
  table[5:600] = True
  ids = np.random.default_rng(0).integers(5, V, size=(B, L)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  batch = {"input_ids": ids, "segment_ids": np.zeros_like(ids)}
  mesh = parallel.make_mesh(config().mesh, jax.devices()[:1])

  def one_step(trainer):
    state, metrics = trainer.train_step(trainer.init_state(), batch)
    return jax.device_get(state.params), jax.device_get(metrics)

  plain = spanlm.Trainer(config(), V, table, mesh)
  params0 = jax.device_get(plain.init_state().params)  # every run starts here (same seed)
  r = np.random.default_rng(1)
  theta = jax.tree.map(lambda p: p + r.normal(size=p.shape).astype(np.float32) * 0.1, params0)
  fisher = jax.tree.map(lambda p: r.random(p.shape).astype(np.float32), params0)
  path = str(tmp_path / "fisher.npz")
  ewc.save(path, fisher, theta)

  base, m0 = one_step(plain)
  pen, m2 = one_step(spanlm.Trainer(config(2, path, 2.0), V, table, mesh))  # 2 micro-batches
  assert "ewc_penalty" not in m0
  want = 1.0 * sum(np.sum(f * (p - t) ** 2) for f, p, t in
                   zip(jax.tree.leaves(fisher), jax.tree.leaves(params0), jax.tree.leaves(theta)))
  np.testing.assert_allclose(m2["ewc_penalty"], want, rtol=1e-5)
  # SGD: the penalty's share of the step is -lr * lambda * F * (theta0 - theta*), added once per
  # step (accumulation itself is exact, so a per-micro-batch penalty would show up here twice).
  for b_, p2, f, p0, t in zip(*map(jax.tree.leaves, (base, pen, fisher, params0, theta))):
    np.testing.assert_allclose(p2 - b_, -0.1 * 2.0 * f * (p0 - t), atol=3e-5)
