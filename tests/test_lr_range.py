"""LR range test (Smith 2017): smoothing, divergence stop and range suggestion on synthetic curves."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spanlm
from spanlm.optim import lr_range


def reference_smooth(losses, beta):
  m, out = 0.0, []
  for i, x in enumerate(losses):
    m = beta * m + (1 - beta) * x
    out.append(m / (1 - beta ** (i + 1)))
  return np.array(out)


def test_exponential_lrs_are_geometric():
  lrs = lr_range.exponential_lrs(1e-5, 1e-1, 101)
  np.testing.assert_allclose([lrs[0], lrs[-1]], [1e-5, 1e-1])
  np.testing.assert_allclose(lrs[1:] / lrs[:-1], 10 ** (4 / 100))
  with pytest.raises(ValueError, match="min_lr"):
    lr_range.exponential_lrs(1.0, 0.1, 10)


def test_smoothing_is_bias_corrected():
  # Bias correction makes a constant sequence smooth to itself from the first step.
  np.testing.assert_allclose(lr_range.smooth([3.0] * 20, 0.98), 3.0)
  x = np.random.default_rng(0).normal(size=50)
  np.testing.assert_allclose(lr_range.smooth(x, 0.9), reference_smooth(x, 0.9))
  np.testing.assert_allclose(lr_range.smooth(x, 0.0), x)


def test_divergence():
  assert lr_range.diverged(4.1, 1.0) and not lr_range.diverged(3.9, 1.0)
  assert lr_range.diverged(float("nan"), 1.0) and lr_range.diverged(float("inf"), 1.0)
  # Bounded losses: back above the start after a real fall, but not noise on a flat start.
  assert lr_range.diverged(9.1, 6.0, start=9.0) and not lr_range.diverged(8.9, 6.0, start=9.0)
  assert not lr_range.diverged(9.1, 8.5, start=9.0)


def curve(lr):
  """A range-test-shaped loss: flat, falls over two decades, minimum at lr=1e-2, then blows up."""
  x = np.log10(lr)
  return 3.0 - 2.0 / (1 + np.exp(-3 * (x + 3))) + np.where(x > -2, 30 * (x + 2) ** 2, 0.0)


def test_suggestion_on_noiseless_curve():
  lrs = lr_range.exponential_lrs(1e-6, 1.0, 301)
  out = lr_range.suggest_range(lrs, curve(lrs))
  assert out["min_loss_lr"] == pytest.approx(1e-2, rel=0.05)
  assert out["steepest_lr"] == pytest.approx(1e-3, rel=0.05)  # the sigmoid's midpoint
  assert out["suggested_max_lr"] == pytest.approx(out["min_loss_lr"] / 10)
  assert out["suggested_min_lr"] == pytest.approx(out["suggested_max_lr"] / 4)


def test_run_stops_at_divergence_and_suggests_from_smoothed_curve():
  lrs = lr_range.exponential_lrs(1e-6, 1.0, 301)
  noise = np.random.default_rng(0).normal(0, 0.05, len(lrs))
  calls = []

  def step(i, lr):
    calls.append(lr)
    return curve(lr) + noise[i]

  out = lr_range.run(step, lrs, beta=0.9, factor=4.0)
  assert out["diverged"] and len(calls) < len(lrs)
  smoothed = reference_smooth(curve(np.array(calls)) + noise[:len(calls)], 0.9)
  np.testing.assert_allclose(out["smoothed"], smoothed)
  # It stopped at the first point that is non-finite, > 4x the best, or back above the start.
  full = reference_smooth(curve(lrs) + noise, 0.9)
  first = next(i for i in range(11, len(lrs))
               if full[i] > 4 * full[10:i].min() or (full[10:i].min() < 0.9 * full[10] and full[i] > full[10]))
  assert len(calls) == first + 1
  # The suggestion comes from the smoothed curve before the divergent point.
  best = 10 + int(np.argmin(smoothed[10:-1]))
  assert out["min_loss_lr"] == pytest.approx(calls[best])
  assert 3e-3 < out["min_loss_lr"] < 3e-2  # near the true minimum, smoothing lag included


def test_ramp_optimizer_is_the_configured_optimizer_at_each_lr():
  """chain(adamw at lr 1, scale lrs[t]) takes exactly adamw's step at lr lrs[t]."""
  c = spanlm.load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "lr_range_test.py"))
  c.optimizer.grad_clip = 0.0
  lrs = lr_range.exponential_lrs(1e-3, 1e-1, 5)
  tx, schedule = lr_range.ramp_optimizer(c, lrs)
  params = {"w": jnp.ones((3, 2)), "bias": jnp.ones((2,))}
  state = tx.init(params)
  moments = optax.scale_by_adam(c.optimizer.b1, c.optimizer.b2, c.optimizer.eps)
  mstate = moments.init(params)
  for t in range(5):
    grads = jax.tree.map(lambda p: jnp.sin(p * (t + 1)), params)
    updates, state = tx.update(grads, state, params)
    direction, mstate = moments.update(grads, mstate, params)
    want = {"w": -lrs[t] * (direction["w"] + c.optimizer.weight_decay * params["w"]),
            "bias": -lrs[t] * direction["bias"]}  # no decay on biases
    np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-5)
    np.testing.assert_allclose(updates["bias"], want["bias"], rtol=1e-5)
    assert float(schedule(t)) == pytest.approx(lrs[t], rel=1e-6)
    params = optax.apply_updates(params, updates)


def test_ramp_is_lars_at_each_rate_from_the_first_step():
  """LARS applies the rate inside its momentum (You et al. 2017, Algorithm 1): the ramp must too."""
  c = spanlm.load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "lr_range_test.py"))
  c.optimizer.name, c.optimizer.grad_clip, c.optimizer.weight_decay = "lars", 0.0, 0.01
  m, eta, beta = c.optimizer.momentum, c.optimizer.trust_coefficient, c.optimizer.weight_decay
  lrs = lr_range.exponential_lrs(1e-2, 1.0, 5)
  tx, _ = lr_range.ramp_optimizer(c, lrs)
  params = {"w": jnp.linspace(0.5, 2.0, 6).reshape(3, 2)}
  state, v, w = tx.init(params), np.zeros((3, 2)), np.asarray(params["w"], np.float64)
  for t in range(5):
    g = np.sin(w * (t + 1))
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    ratio = eta * np.linalg.norm(w) / (np.linalg.norm(g) + beta * np.linalg.norm(w))
    v = m * v + lrs[t] * ratio * (g + beta * w)  # gamma_t inside the momentum
    np.testing.assert_allclose(updates["w"], -v, rtol=2e-4)
    params = optax.apply_updates(params, updates)
    w = w - v


def test_a_run_that_blows_up_early_returns_what_it_has(caplog):
  lrs = lr_range.exponential_lrs(1e-3, 1.0, 50)
  losses = [5.0, 4.0, float("nan")]
  out = lr_range.run(lambda i, lr: losses[i], lrs, skip_start=10, log=print)
  assert out["diverged"] and len(out["losses"]) == 3
  assert out["min_loss_lr"] == pytest.approx(lrs[1])  # the lowest loss before the blow-up
  assert "returning what it has" in caplog.text
  first = lr_range.run(lambda i, lr: float("inf"), lrs, skip_start=0)  # diverged at once
  assert first["diverged"] and first["min_loss_lr"] == pytest.approx(lrs[0])


def test_plot_writes_a_png_of_the_run_and_closes_it(tmp_path):
  pytest.importorskip("matplotlib")
  import matplotlib.pyplot as plt
  lrs = lr_range.exponential_lrs(1e-6, 1.0, 301)
  out = lr_range.run(lambda i, lr: curve(lr), lrs, beta=0.9, factor=4.0)
  written = lr_range.plot(out, tmp_path / "plots" / "lr_range.png")  # the folder is created
  data = (tmp_path / "plots" / "lr_range.png").read_bytes()
  assert written == str(tmp_path / "plots" / "lr_range.png")
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a drawn figure, not an empty canvas
  assert not plt.get_fignums()
