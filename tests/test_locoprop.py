"""LocoProp (Amid, Anil, Warmuth 2022): first-step equivalence with BackProp, local-loss gradients, training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanlm.optim import locoprop

SIZES, ACTS = (6, 5, 3, 5, 6), ("tanh", "identity", "sigmoid", "sigmoid")


def bce(logits, batch):
  """Sigmoid cross-entropy per example, summed over outputs."""
  return jnp.sum(jnp.logaddexp(0.0, logits) - batch["x"] * logits, axis=-1)


@pytest.fixture(scope="module")
def problem():
  params = locoprop.init_mlp(jax.random.PRNGKey(0), SIZES)
  x = jax.random.uniform(jax.random.PRNGKey(1), (16, SIZES[0]))
  return params, {"x": x}


def mean_loss(params, batch):
  # The last layer's sigmoid lives in the loss (logits in), as in locoprop.backprop.
  return jnp.mean(bce(locoprop.forward(params, ACTS, batch["x"])[0], batch))


@pytest.mark.parametrize("variant", ["S", "M"])
def test_one_inner_step_is_a_backprop_sgd_step(problem, variant):
  """One inner step of size rho on targets gamma away == SGD with lr rho * gamma, all layers."""
  params, batch = problem
  rho, gamma = 0.5, 0.2
  new, loss = locoprop.locoprop_step(params, ACTS, bce, batch, variant=variant, gamma=gamma,
                                     inner_steps=1, inner_lr=rho, eta=0.37)
  grads = jax.grad(mean_loss)(params, batch)
  sgd = jax.tree.map(lambda p, g: p - rho * gamma * g, params, grads)
  np.testing.assert_allclose(loss, mean_loss(params, batch), rtol=1e-6)
  for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(sgd)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Two inner steps are not SGD any more (the local curvature and the proximal term enter).
  two, _ = locoprop.locoprop_step(params, ACTS, bce, batch, variant=variant, gamma=gamma,
                                  inner_steps=2, inner_lr=rho, eta=0.37)
  assert not np.allclose(two[0]["w"], sgd[0]["w"] - (sgd[0]["w"] - params[0]["w"]), atol=1e-4)


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu", "identity"])
def test_matching_loss_gradient_closed_form(act):
  """d/dW of the M loss is (1/N) x^T (f(xW + b) - y_hat); d/db the row mean of the error."""
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(7, 4)), jnp.float32)
  layer = {"w": jnp.asarray(r.normal(size=(4, 3)), jnp.float32), "b": jnp.asarray(r.normal(size=3), jnp.float32)}
  y_hat = jnp.asarray(r.normal(size=(7, 3)), jnp.float32)
  f = locoprop.ACTIVATIONS[act][0]
  g = jax.grad(locoprop.local_loss)(layer, x, y_hat, act, "M")
  err = f(x @ layer["w"] + layer["b"]) - y_hat
  np.testing.assert_allclose(g["w"], x.T @ err / 7, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g["b"], err.mean(0), rtol=1e-5, atol=1e-6)
  # The solver's closed-form gradient is that autodiff gradient, for both variants.
  for variant in ("M", "S"):
    auto = jax.grad(locoprop.local_loss)(layer, x, y_hat, act, variant)
    closed = locoprop.local_grad(layer, x, y_hat, act, variant)
    for k in auto:
      np.testing.assert_allclose(closed[k], auto[k], rtol=1e-5, atol=1e-6)
  # With f = identity, M's loss is S's squared loss up to a constant: same gradient.
  if act == "identity":
    gs = jax.grad(locoprop.local_loss)(layer, x, y_hat, act, "S")
    np.testing.assert_allclose(gs["w"], g["w"], rtol=1e-5)


def test_proximal_term_limits_the_move(problem):
  params, batch = problem
  kw = dict(variant="S", gamma=1.0, inner_steps=50, inner_lr=0.05)  # stable: inner_lr / eta < 2
  near, _ = locoprop.locoprop_step(params, ACTS, bce, batch, eta=0.1, **kw)
  far, _ = locoprop.locoprop_step(params, ACTS, bce, batch, eta=100.0, **kw)
  dist = lambda p: float(jnp.linalg.norm(p[0]["w"] - params[0]["w"]))
  assert dist(near) < 0.5 * dist(far)


@pytest.mark.parametrize("variant", ["S", "M"])
def test_locoprop_trains_a_tiny_autoencoder(variant):
  sizes, acts = (8, 6, 2, 6, 8), ("tanh", "identity", "tanh", "sigmoid")
  r = np.random.default_rng(0)
  # Data on a 2-d manifold, so the 2-unit bottleneck can reconstruct it.
  z = r.normal(size=(64, 2))
  x = jnp.asarray(1 / (1 + np.exp(-(z @ r.normal(size=(2, 8))))), jnp.float32)
  params = locoprop.init_mlp(jax.random.PRNGKey(0), sizes)
  step = jax.jit(functools.partial(locoprop.locoprop_step, activations=acts, loss_fn=bce, variant=variant,
                                   gamma=1.0, inner_steps=5, inner_lr=0.3, eta=1.0))
  losses = []
  for _ in range(150):
    params, loss = step(params, batch={"x": x})
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  # BCE has a floor (the targets' entropy): compare the excess loss over it.
  floor = float(jnp.sum(-(x * jnp.log(x) + (1 - x) * jnp.log1p(-x)), -1).mean())
  assert losses[-1] - floor < 0.5 * (losses[0] - floor), (losses[0], losses[-1], floor)
