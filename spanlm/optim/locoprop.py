r"""LocoProp (Amid, Anil, Warmuth 2022, "LocoProp: Enhancing BackProp via Local Loss Optimization").

A stack of dense layers a_k = x_k W_k + b_k, y_k = f_k(a_k), x_{k+1} = y_k, and
a loss L = (1/N) sum_n l_n(a_K). One LocoProp step:

1. Forward and backward pass as in BackProp; keep each layer's input x_k,
   pre-activation a_k and the per-example gradient g_k = d l_n / d a_k
   (= N * dL/da_k).
2. Give each layer a target one gradient step away:
     LocoProp-S:  a_hat_k = a_k - gamma g_k                  (pre-activation target)
     LocoProp-M:  y_hat_k = f_k(a_k) - gamma g_k             (post-activation target)
3. Every layer, independently (its input x_k fixed from step 1), takes T
   steps of a first-order optimizer on its local loss
     S:  sum_n 1/2 ||x_n W + b - a_hat_n||^2
     M:  sum_n sum_j [F(a_nj) - y_hat_nj a_nj]
   where F is the convex integral of the transfer function (F' = f: log cosh
   for tanh, softplus for sigmoid, a^2/2 for identity). The M loss is the
   matching loss (Bregman divergence D_F(a, f^-1(y_hat))) up to a term
   constant in W; its gradient is x^T (f(a) - y_hat), the "error through the
   transfer function", which keeps the local problem convex in W.

Two inner solvers (`solver=`):

- "rmsprop" (default): the google-research reference notebook
  (google-research/locoprop/locoprop_training.ipynb, read 2026-12-02). Targets
  are `a - act_lr * dL/da` with L the BATCH-MEAN loss (so gamma = act_lr / N),
  local gradients are batch SUMS (x^T err, sum_n err), there is no proximal or
  weight-decay term, and each layer has its own TF1 RMSProp (rms initialised
  to 1, eps inside the sqrt, heavy-ball momentum):
      ms  <- decay ms + (1 - decay) g^2
      mom <- momentum mom + lr_t g / sqrt(ms + eps)
      W   <- W - mom
  with lr_t = learning_rate * max(1 - t/T, 0.25) at inner step t = 0..T-1 (the
  step counter restarts every outer step) while ms and mom PERSIST across outer
  steps. Reference defaults: T=10, act_lr=10, learning_rate=1e-5 (the outer
  schedule multiplies it), decay 0.9, momentum 0.999, eps 1e-5.
- "gd_prox": spanlm's earlier solver: T plain GD steps of size inner_lr on the
  batch-MEAN local loss plus 1/(2 eta) ||(W, b) - (W, b)_old||^2, targets with
  per-example gamma. First-step equivalence (derived, tested): at (W, b)_old
  the proximal gradient is 0 and both local gradients equal
  gamma * (1/N) sum_n x_n^T g_n = gamma * dL/dW, so ONE inner step is exactly a
  BackProp SGD step with learning rate inner_lr * gamma on every layer at once.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# name -> (transfer function f, its convex integral F with F' = f)
ACTIVATIONS = {
    "identity": (lambda a: a, lambda a: 0.5 * jnp.square(a)),
    "tanh": (jnp.tanh, lambda a: jnp.logaddexp(a, -a) - jnp.log(2.0)),  # log cosh
    "sigmoid": (jax.nn.sigmoid, jax.nn.softplus),
    "relu": (jax.nn.relu, lambda a: 0.5 * jnp.square(jax.nn.relu(a))),
}
VARIANTS = ("S", "M")
SOLVERS = ("rmsprop", "gd_prox")
# Each solver's hyperparameters and their defaults (rmsprop: the reference notebook's flags).
SOLVER_DEFAULTS = {
    "rmsprop": dict(act_lr=10.0, learning_rate=1e-5, decay=0.9, momentum=0.999, eps=1e-5),
    "gd_prox": dict(gamma=1.0, inner_lr=0.1, eta=1.0),
}


def init_mlp(rng, sizes: Sequence[int]) -> list[dict]:
  """Dense layers sizes[0] -> ... -> sizes[-1], Glorot-uniform weights, zero biases."""
  params = []
  for key, (din, dout) in zip(jax.random.split(rng, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    lim = np.sqrt(6.0 / (din + dout))
    params.append({"w": jax.random.uniform(key, (din, dout), minval=-lim, maxval=lim), "b": jnp.zeros(dout)})
  return params


def forward(params, activations: Sequence[str], x, deltas=None):
  """(last pre-activation, inputs x_k, pre-activations a_k); `deltas` are added to each a_k."""
  inputs, pre = [], []
  for k, (layer, act) in enumerate(zip(params, activations)):
    inputs.append(x)
    a = x @ layer["w"] + layer["b"]
    if deltas is not None:
      a = a + deltas[k]
    pre.append(a)
    x = ACTIVATIONS[act][0](a)
  return pre[-1], inputs, pre


def backprop(params, activations, loss_fn: Callable, batch):
  """Mean loss, layer inputs, pre-activations and per-example gradients g_k = d l_n / d a_k.

  `loss_fn(last_preactivation, batch) -> [N]` per-example losses (it applies
  the output transfer function itself, e.g. sigmoid cross-entropy on logits).
  """
  _, inputs, pre = forward(params, activations, batch["x"])
  zeros = [jnp.zeros_like(a) for a in pre]
  total = lambda d: jnp.sum(loss_fn(forward(params, activations, batch["x"], d)[0], batch))
  grads = jax.grad(total)(zeros)  # per-example: the sum's gradient at row n is d l_n / d a_n
  return total(zeros) / batch["x"].shape[0], inputs, pre, grads


def targets(pre, grads, activations, variant: str, gamma: float):
  """S: a_hat = a - gamma g (pre-activations); M: y_hat = f(a) - gamma g (post-activations)."""
  if variant == "S":
    return [a - gamma * g for a, g in zip(pre, grads)]
  if variant == "M":
    return [ACTIVATIONS[act][0](a) - gamma * g for a, g, act in zip(pre, grads, activations)]
  raise ValueError(f"unknown LocoProp variant {variant!r}; choose one of {VARIANTS}")


def local_loss(layer, x, target, activation: str, variant: str):
  """The layer's local loss (without the proximal term), mean over the batch."""
  a = x @ layer["w"] + layer["b"]
  if variant == "S":
    return 0.5 * jnp.sum(jnp.square(a - target)) / x.shape[0]
  big_f = ACTIVATIONS[activation][1]
  return jnp.sum(big_f(a) - target * a) / x.shape[0]


def local_grad(layer, x, target, activation: str, variant: str):
  """Closed-form gradient of `local_loss` (batch mean): (1/N) x^T err and mean(err), with
  err = a - a_hat (S) or f(a) - y_hat (M). Cheaper than autodiff through F."""
  a = x @ layer["w"] + layer["b"]
  err = a - target if variant == "S" else ACTIVATIONS[activation][0](a) - target
  return {"w": x.T @ err / x.shape[0], "b": jnp.mean(err, axis=0)}


class InnerState(NamedTuple):
  """The reference solver's per-layer RMSProp slots; they persist across outer steps."""
  ms: list  # per layer {"w", "b"}: running mean of squared local gradients (starts at 1, as TF1)
  mom: list  # per layer {"w", "b"}: heavy-ball momentum (starts at 0)


def init_state(params) -> InnerState:
  return InnerState([jax.tree.map(jnp.ones_like, p) for p in params],
                    [jax.tree.map(jnp.zeros_like, p) for p in params])


def inner_rate_decay(t, inner_steps: int):
  """The reference's inner-rate factor at inner step t: max(1 - t / T, 0.25)."""
  return jnp.maximum(1.0 - t / inner_steps, 0.25)


def solve_local_rmsprop(layer, ms, mom, x, target, activation: str, variant: str, *, inner_steps: int,
                        learning_rate, decay: float, momentum: float, eps: float):
  """`inner_steps` TF1-RMSProp steps on the batch-SUM local loss; returns (layer, ms, mom)."""
  n = x.shape[0]

  def body(t, carry):
    p, s, m = carry
    g = jax.tree.map(lambda v: n * v, local_grad(p, x, target, activation, variant))
    lr = learning_rate * inner_rate_decay(t, inner_steps)
    s = jax.tree.map(lambda s_, g_: decay * s_ + (1 - decay) * jnp.square(g_), s, g)
    m = jax.tree.map(lambda m_, g_, s_: momentum * m_ + lr * g_ / jnp.sqrt(s_ + eps), m, g, s)
    return jax.tree.map(lambda p_, m_: p_ - m_, p, m), s, m

  return jax.lax.fori_loop(0, inner_steps, body, (layer, ms, mom))


def solve_local_gd_prox(layer, x, target, activation: str, variant: str, *, inner_steps: int,
                        inner_lr: float, eta: float):
  """`inner_steps` GD steps of size `inner_lr` on local loss (mean) + 1/(2 eta) ||layer - layer_old||^2."""
  old = layer

  def body(_, p):
    g = local_grad(p, x, target, activation, variant)
    return {k: p[k] - inner_lr * (g[k] + (p[k] - old[k]) / eta) for k in p}

  return jax.lax.fori_loop(0, inner_steps, body, layer)


def solver_settings(solver: str, **kw) -> dict:
  """The solver's hyperparameters: its defaults overridden by `kw` (unknown names are an error)."""
  if solver not in SOLVERS:
    raise ValueError(f"unknown LocoProp inner solver {solver!r}; choose one of {SOLVERS}")
  unknown = set(kw) - set(SOLVER_DEFAULTS[solver])
  if unknown:
    raise ValueError(f"LocoProp solver {solver!r} takes {sorted(SOLVER_DEFAULTS[solver])}, "
                     f"not {sorted(unknown)}")
  return {**SOLVER_DEFAULTS[solver], **kw}


def locoprop_step(params, state, activations, loss_fn, batch, *, variant: str = "M",
                  solver: str = "rmsprop", inner_steps: int = 10, **solver_kw):
  """One LocoProp step on every layer; returns (params, state, loss at the old params).

  Jit it with everything but (params, state, batch) bound; `learning_rate` (rmsprop) may be a
  traced scalar so that an outer schedule can drive it. `state` is `init_state(params)` for
  "rmsprop" and is passed through unchanged (may be None) for "gd_prox". `solver_kw`: see
  SOLVER_DEFAULTS.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown LocoProp variant {variant!r}; choose one of {VARIANTS}")
  if inner_steps < 1:
    raise ValueError(f"LocoProp inner_steps={inner_steps} must be at least 1")
  hp = solver_settings(solver, **solver_kw)
  loss, inputs, pre, grads = backprop(params, activations, loss_fn, batch)
  n = batch["x"].shape[0]
  if solver == "gd_prox":
    tgts = targets(pre, grads, activations, variant, hp["gamma"])
    new = [solve_local_gd_prox(layer, x, t, act, variant, inner_steps=inner_steps, inner_lr=hp["inner_lr"],
                               eta=hp["eta"]) for layer, x, t, act in zip(params, inputs, tgts, activations)]
    return new, state, loss
  if state is None:
    raise ValueError("LocoProp solver 'rmsprop' keeps per-layer state: pass state=init_state(params)")
  tgts = targets(pre, grads, activations, variant, hp["act_lr"] / n)  # act_lr * d(mean loss)/da
  new, ms, mom = [], [], []
  for layer, s, m, x, t, act in zip(params, state.ms, state.mom, inputs, tgts, activations):
    p, s, m = solve_local_rmsprop(layer, s, m, x, t, act, variant, inner_steps=inner_steps,
                                  learning_rate=hp["learning_rate"], decay=hp["decay"],
                                  momentum=hp["momentum"], eps=hp["eps"])
    new.append(p)
    ms.append(s)
    mom.append(m)
  return new, InnerState(ms, mom), loss
