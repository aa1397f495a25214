r"""LocoProp (Amid, Anil, Warmuth 2022, "LocoProp: Enhancing BackProp via Local Loss Optimization").

A stack of dense layers a_k = x_k W_k + b_k, y_k = f_k(a_k), x_{k+1} = y_k, and
a loss L = (1/N) sum_n l_n(a_K). One LocoProp step:

1. Forward and backward pass as in BackProp; keep each layer's input x_k,
   pre-activation a_k and the per-example gradient g_k = d l_n / d a_k
   (= N * dL/da_k).
2. Give each layer a target one gradient step away (step size gamma):
     LocoProp-S:  a_hat_k = a_k - gamma g_k                  (pre-activation target)
     LocoProp-M:  y_hat_k = f_k(a_k) - gamma g_k             (post-activation target)
3. Every layer, independently (its input x_k fixed from step 1), takes T
   gradient steps of size rho on its local objective
     S:  (1/N) sum_n 1/2 ||x_n W + b - a_hat_n||^2           + 1/(2 eta) ||(W, b) - (W, b)_old||^2
     M:  (1/N) sum_n sum_j [F(a_nj) - y_hat_nj a_nj]          + 1/(2 eta) ||(W, b) - (W, b)_old||^2
   where F is the convex integral of the transfer function (F' = f: log cosh
   for tanh, softplus for sigmoid, a^2/2 for identity). The M loss is the
   matching loss (Bregman divergence D_F(a, f^-1(y_hat))) up to a term
   constant in W; its gradient is (1/N) sum_n x_n^T (f(a_n) - y_hat_n), the
   "error through the transfer function", which keeps the local problem convex
   in W where the squared loss through f would not be.

First-step equivalence (the paper's construction, derived): at (W, b)_old the
proximal term has zero gradient and both local gradients equal
gamma * (1/N) sum_n x_n^T g_n = gamma * dL/dW. So ONE inner step of size rho
is exactly a BackProp SGD step with learning rate alpha = rho * gamma on every
layer at once (inputs from the same forward pass), for S and M alike. More
inner steps move each layer further along its own curvature (x^T x for S,
x^T diag(f'(a)) x for M), which is where LocoProp's gain over SGD comes from;
the proximal term (eta) keeps the layer from running off with a stale target.
"""

from __future__ import annotations

from typing import Callable, Sequence

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
  """Closed-form gradient of `local_loss`: (1/N) x^T err and mean(err), with
  err = a - a_hat (S) or f(a) - y_hat (M). Cheaper than autodiff through F."""
  a = x @ layer["w"] + layer["b"]
  err = a - target if variant == "S" else ACTIVATIONS[activation][0](a) - target
  return {"w": x.T @ err / x.shape[0], "b": jnp.mean(err, axis=0)}


def solve_local(layer, x, target, activation: str, variant: str, *, inner_steps: int,
                inner_lr: float, eta: float):
  """`inner_steps` GD steps of size `inner_lr` on local loss + 1/(2 eta) ||layer - layer_old||^2."""
  old = layer

  def body(_, p):
    g = local_grad(p, x, target, activation, variant)
    return {k: p[k] - inner_lr * (g[k] + (p[k] - old[k]) / eta) for k in p}

  return jax.lax.fori_loop(0, inner_steps, body, layer)


def locoprop_step(params, activations, loss_fn, batch, *, variant: str = "M", gamma: float = 1.0,
                  inner_steps: int = 10, inner_lr: float = 0.1, eta: float = 1.0):
  """One LocoProp step on every layer (jit it with the keyword arguments bound); returns (params, loss)."""
  loss, inputs, pre, grads = backprop(params, activations, loss_fn, batch)
  tgts = targets(pre, grads, activations, variant, gamma)
  new = [solve_local(layer, x, t, act, variant, inner_steps=inner_steps, inner_lr=inner_lr, eta=eta)
         for layer, x, t, act in zip(params, inputs, tgts, activations)]
  return new, loss
