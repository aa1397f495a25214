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


# --- NumPy references, written from the reference notebook's description --------------------------

NP_ACT = {"identity": (lambda a: a, lambda a: np.ones_like(a)),
          "tanh": (np.tanh, lambda a: 1 - np.tanh(a) ** 2),
          "sigmoid": (lambda a: 1 / (1 + np.exp(-a)), lambda a: np.exp(-a) / (1 + np.exp(-a)) ** 2)}


def np_forward_backward(params, acts, x):
  """Layer inputs, pre-activations and d(mean BCE)/da_k by hand (sigmoid lives in the loss)."""
  inputs, pre, h = [], [], x
  for p, act in zip(params, acts):
    inputs.append(h)
    pre.append(h @ p["w"] + p["b"])
    h = NP_ACT[act][0](pre[-1])
  n = x.shape[0]
  deltas = [None] * len(params)
  deltas[-1] = (NP_ACT["sigmoid"][0](pre[-1]) - x) / n  # d/da of mean_n sum_j BCE(x_nj, sigmoid(a_nj))
  for k in range(len(params) - 2, -1, -1):
    deltas[k] = (deltas[k + 1] @ params[k + 1]["w"].T) * NP_ACT[acts[k]][1](pre[k])
  return inputs, pre, deltas


def np_reference_step(params, ms, mom, acts, x, variant, act_lr, lr, T, decay=0.9, momentum=0.999, eps=1e-5):
  """One outer step of the notebook's LocoProp with per-layer TF1 RMSProp (state carried by the caller)."""
  inputs, pre, deltas = np_forward_backward(params, acts, x)
  new = []
  for k, (p, act) in enumerate(zip(params, acts)):
    f = NP_ACT[act][0]
    target = (pre[k] if variant == "S" else f(pre[k])) - act_lr * deltas[k]
    w, b = p["w"].copy(), p["b"].copy()
    for t in range(T):
      a = inputs[k] @ w + b
      err = a - target if variant == "S" else f(a) - target
      for name, g in (("w", inputs[k].T @ err), ("b", err.sum(0))):
        rate = lr * max(1 - t / T, 0.25)
        ms[k][name] = decay * ms[k][name] + (1 - decay) * g ** 2
        mom[k][name] = momentum * mom[k][name] + rate * g / np.sqrt(ms[k][name] + eps)
        if name == "w":
          w = w - mom[k][name]
        else:
          b = b - mom[k][name]
    new.append({"w": w, "b": b})
  return new


def to_np(params):
  return [{k: np.asarray(v, np.float64) for k, v in p.items()} for p in params]


@pytest.mark.parametrize("variant", ["S", "M"])
def test_reference_solver_matches_numpy_over_outer_steps(problem, variant):
  """The default solver == the notebook's algorithm: RMSProp state persists, rate decays inside."""
  params, batch = problem
  hp = dict(act_lr=3.0, learning_rate=2e-3)
  T = 4
  step = jax.jit(functools.partial(locoprop.locoprop_step, activations=ACTS, loss_fn=bce, variant=variant,
                                   inner_steps=T, **hp))
  state = locoprop.init_state(params)
  got = params
  want = to_np(params)
  ms = [{k: np.ones_like(v) for k, v in p.items()} for p in want]
  mom = [{k: np.zeros_like(v) for k, v in p.items()} for p in want]
  x = np.asarray(batch["x"], np.float64)
  for i in range(3):  # three outer steps: catches state that is reset instead of carried
    xi = x ** (1 + 0.5 * i)  # a different batch each step (same shape: one compilation)
    got, state, _ = step(got, state, batch={"x": jnp.asarray(xi, jnp.float32)})
    want = np_reference_step(want, ms, mom, ACTS, xi, variant, lr=hp["learning_rate"], T=T, act_lr=hp["act_lr"])
    for g, w in zip(got, want):
      for k in g:
        np.testing.assert_allclose(g[k], w[k], rtol=2e-4, atol=2e-6)
  for s, w in zip(state.mom, mom):
    np.testing.assert_allclose(s["w"], w["w"], rtol=2e-4, atol=1e-9)


@pytest.mark.slow
def test_reference_solver_runs_every_inner_step(problem):
  """T=1 and T=3 differ from each other, and T=3 is NumPy's 3-step answer, not its 1-step one."""
  params, batch = problem
  x = np.asarray(batch["x"], np.float64)
  out = {}
  for T in (1, 3):
    new, _, _ = locoprop.locoprop_step(params, locoprop.init_state(params), ACTS, bce, batch, inner_steps=T,
                                       learning_rate=1e-2)
    want = np_reference_step(to_np(params), [{k: np.ones_like(v) for k, v in p.items()} for p in to_np(params)],
                             [{k: np.zeros_like(v) for k, v in p.items()} for p in to_np(params)],
                             ACTS, x, "M", act_lr=10.0, lr=1e-2, T=T)
    np.testing.assert_allclose(new[0]["w"], want[0]["w"], rtol=2e-4, atol=2e-6)
    out[T] = np.asarray(new[0]["w"])
  assert np.abs(out[3] - out[1]).max() > 1e-3


@pytest.mark.parametrize("variant", ["S", "M"])
@pytest.mark.slow
def test_gd_prox_one_inner_step_is_a_backprop_sgd_step(problem, variant):
  """gd_prox: one inner step of size rho on targets gamma away == SGD with lr rho * gamma."""
  params, batch = problem
  rho, gamma, eta = 0.5, 0.2, 0.37
  kw = dict(variant=variant, solver="gd_prox", gamma=gamma, inner_lr=rho, eta=eta)
  new, _, loss = locoprop.locoprop_step(params, None, ACTS, bce, batch, inner_steps=1, **kw)
  grads = jax.grad(mean_loss)(params, batch)
  sgd = jax.tree.map(lambda p, g: p - rho * gamma * g, params, grads)
  np.testing.assert_allclose(loss, mean_loss(params, batch), rtol=1e-6)
  for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(sgd)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Three inner steps == NumPy's three proximal GD steps on the local loss (a solver that stops
  # after one step, or ignores the proximal term, fails here).
  three, _, _ = locoprop.locoprop_step(params, None, ACTS, bce, batch, inner_steps=3, **kw)
  inputs, pre, deltas = np_forward_backward(to_np(params), ACTS, np.asarray(batch["x"], np.float64))
  n = batch["x"].shape[0]
  for k, (p, act) in enumerate(zip(to_np(params), ACTS)):
    f = NP_ACT[act][0]
    target = (pre[k] if variant == "S" else f(pre[k])) - gamma * n * deltas[k]
    w, b = p["w"], p["b"]
    for _ in range(3):
      a = inputs[k] @ w + b
      err = a - target if variant == "S" else f(a) - target
      w, b = (w - rho * (inputs[k].T @ err / n + (w - p["w"]) / eta),
              b - rho * (err.mean(0) + (b - p["b"]) / eta))
    np.testing.assert_allclose(three[k]["w"], w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(three[k]["b"], b, rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(three[0]["w"]) - np.asarray(sgd[0]["w"])).max() > 1e-4


def test_bad_solver_arguments_are_one_clear_error(problem):
  params, batch = problem
  with pytest.raises(ValueError, match="takes"):
    locoprop.locoprop_step(params, None, ACTS, bce, batch, solver="gd_prox", act_lr=1.0)
  with pytest.raises(ValueError, match="init_state"):
    locoprop.locoprop_step(params, None, ACTS, bce, batch)
  with pytest.raises(ValueError, match="solver"):
    locoprop.locoprop_step(params, None, ACTS, bce, batch, solver="adam")


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
  kw = dict(variant="S", solver="gd_prox", gamma=1.0, inner_steps=50, inner_lr=0.05)  # inner_lr / eta < 2
  near, _, _ = locoprop.locoprop_step(params, None, ACTS, bce, batch, eta=0.1, **kw)
  far, _, _ = locoprop.locoprop_step(params, None, ACTS, bce, batch, eta=100.0, **kw)
  dist = lambda p: float(jnp.linalg.norm(p[0]["w"] - params[0]["w"]))
  assert dist(near) < 0.5 * dist(far)


@pytest.mark.parametrize("variant,solver,kw", [
    ("S", "gd_prox", dict(gamma=1.0, inner_lr=0.3, eta=1.0)), ("M", "gd_prox", dict(gamma=1.0, inner_lr=0.3, eta=1.0)),
    ("M", "rmsprop", dict(act_lr=10.0, learning_rate=1e-4))])
@pytest.mark.slow
def test_locoprop_trains_a_tiny_autoencoder(variant, solver, kw):
  sizes, acts = (8, 6, 2, 6, 8), ("tanh", "identity", "tanh", "sigmoid")
  r = np.random.default_rng(0)
  # Data on a 2-d manifold, so the 2-unit bottleneck can reconstruct it.
  z = r.normal(size=(64, 2))
  x = jnp.asarray(1 / (1 + np.exp(-(z @ r.normal(size=(2, 8))))), jnp.float32)
  params = locoprop.init_mlp(jax.random.PRNGKey(0), sizes)
  step = jax.jit(functools.partial(locoprop.locoprop_step, activations=acts, loss_fn=bce, variant=variant,
                                   solver=solver, inner_steps=5, **kw))
  state, losses = locoprop.init_state(params), []
  for _ in range(150):
    params, state, loss = step(params, state, batch={"x": x})
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  # BCE has a floor (the targets' entropy): compare the excess loss over it.
  floor = float(jnp.sum(-(x * jnp.log(x) + (1 - x) * jnp.log1p(-x)), -1).mean())
  assert losses[-1] - floor < 0.5 * (losses[0] - floor), (losses[0], losses[-1], floor)
