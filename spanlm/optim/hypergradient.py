"""Hypergradient descent (Baydin, Cornish, Martinez Rubio, Schmidt & Wood 2018,
"Online Learning Rate Adaptation with Hypergradient Descent", ICLR, arXiv:1703.04782).

An update u_{t-1} = -alpha d_{t-1} moved theta_{t-2} to theta_{t-1}, so the
derivative of the loss at theta_{t-1} with respect to the rate used is

  h_t = d f(theta_{t-1}) / d alpha_{t-1} = g_t . (d u_{t-1} / d alpha) = -g_t . d_{t-1}

and the rate follows it by gradient descent with hyper-rate beta (Algorithm 1):

  alpha_t = alpha_{t-1} - beta h_t
  SGD-HD:   d_t = g_t                                  u_t = -alpha_t d_t
  SGDN-HD:  v_t = mu v_{t-1} + g_t, d_t = g_t + mu v_t (Nesterov; heavy ball d_t = v_t)
  Adam-HD:  d_t = m^_t / (sqrt(v^_t) + eps)            (bias-corrected Adam moments)

with d_0 = 0 (so h_1 = 0). The dot product is summed over the whole model, or
taken per tensor (`per_tensor=True`: one alpha per parameter leaf). alpha is kept
at least `min_learning_rate` so a run of positive h cannot flip the update's sign.

`hypergradient_descent` is the general mechanism for any numeric hyperparameter
eta injected with `optax.inject_hyperparams`: the tangent d u_{t-1} / d eta comes
from a forward-mode JVP through the optimizer's update, and eta_t = eta_{t-1} - beta g_t . (d u_{t-1} / d eta).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from spanlm.optim.common import check_hyperparams, tree_vdot


class HypergradientState(NamedTuple):
  learning_rate: jax.Array  # alpha_t: scalar, or (leaves,) with per_tensor
  hypergradient: jax.Array  # h_t of the last update (same shape as learning_rate)
  direction: Any  # d_{t-1} (params-like), so that u_{t-1} = -alpha d_{t-1}
  inner_state: Any  # the direction transformation's state


def scale_by_hypergradient_learning_rate(
    direction: optax.GradientTransformation, learning_rate: float, hyper_lr: float,
    per_tensor: bool = False, min_learning_rate: float = 1e-10) -> optax.GradientTransformation:
  """u_t = -alpha_t d_t with alpha_t adapted by hypergradient descent; d_t = direction(g_t)."""
  check_hyperparams("hypergradient", learning_rate)
  if not hyper_lr >= 0:
    raise ValueError(f"hypergradient: hyper_lr={hyper_lr} must be non-negative")

  def init_fn(params):
    shape = [len(jax.tree.leaves(params))] if per_tensor else []
    alpha = jnp.full(shape, learning_rate, jnp.float32)
    return HypergradientState(alpha, jnp.zeros_like(alpha), _zeros_like(params), direction.init(params))

  def update_fn(updates, state, params=None):
    if per_tensor:
      h = -jnp.stack([jnp.vdot(g.astype(jnp.float32), d.astype(jnp.float32)) for g, d in
                      zip(jax.tree.leaves(updates), jax.tree.leaves(state.direction))])
    else:
      h = -tree_vdot(updates, state.direction)
    alpha = jnp.maximum(state.learning_rate - hyper_lr * h, min_learning_rate)
    d, inner = direction.update(updates, state.inner_state, params)
    if per_tensor:
      leaves, treedef = jax.tree.flatten(d)
      new = treedef.unflatten([-alpha[i].astype(x.dtype) * x for i, x in enumerate(leaves)])
    else:
      new = jax.tree.map(lambda x: -alpha.astype(x.dtype) * x, d)
    return new, HypergradientState(alpha, h, d, inner)

  return optax.GradientTransformation(init_fn, update_fn)


def _zeros_like(params):
  return jax.tree.map(jnp.zeros_like, params)


def sgd_hd(learning_rate: float, hyper_lr: float, momentum: float = 0.0, nesterov: bool = True,
           per_tensor: bool = False, min_learning_rate: float = 1e-10
           ) -> optax.GradientTransformation:
  """SGD-HD, or SGDN-HD with momentum (Nesterov, as in the paper; nesterov=False: heavy ball).

  Args:
    learning_rate: alpha_0. hyper_lr: beta, the rate's own learning rate.
    momentum: mu (0 = plain SGD-HD). per_tensor: one alpha per parameter leaf.
    min_learning_rate: floor that keeps alpha positive.
  """
  check_hyperparams("sgd_hd", learning_rate, momentum=momentum)
  direction = optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity()
  return scale_by_hypergradient_learning_rate(direction, learning_rate, hyper_lr, per_tensor,
                                              min_learning_rate)


def adam_hd(learning_rate: float, hyper_lr: float, b1: float = 0.9, b2: float = 0.999,
            eps: float = 1e-8, per_tensor: bool = False, min_learning_rate: float = 1e-10
            ) -> optax.GradientTransformation:
  """Adam-HD: Adam whose rate alpha is adapted by hypergradient descent (paper's Algorithm 1)."""
  check_hyperparams("adam_hd", learning_rate, b1=b1, b2=b2)
  return scale_by_hypergradient_learning_rate(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                                              learning_rate, hyper_lr, per_tensor, min_learning_rate)


class HyperparamHypergradientState(NamedTuple):
  inner_state: Any  # the wrapped transformation's InjectHyperparamsState (holds eta_t)
  tangents: dict  # name -> d u_{t-1} / d eta (params-like)
  hypergradients: dict  # name -> h_t = g_t . d u_{t-1} / d eta, the last one


def hypergradient_descent(tx: optax.GradientTransformation, hyper_lrs: dict[str, float],
                          bounds: dict[str, tuple[float, float]] | None = None
                          ) -> optax.GradientTransformation:
  """Adapt numeric hyperparameters of `tx = optax.inject_hyperparams(factory)(...)` online.

  Args:
    tx: a transformation from `optax.inject_hyperparams`; each adapted hyperparameter must be
      given as a number (not a schedule), e.g. `inject_hyperparams(optax.adamw)(
      learning_rate=1e-3, weight_decay=1e-2)`.
    hyper_lrs: name -> beta, the hyperparameter's own learning rate.
    bounds: name -> (low, high) the value is clipped to after each step (e.g. (0, 1) for b1).
  """
  bounds = bounds or {}
  names = tuple(hyper_lrs)

  def init_fn(params):
    inner = tx.init(params)
    hyper = getattr(inner, "hyperparams", None)
    if hyper is None:
      raise ValueError("hypergradient_descent: tx must come from optax.inject_hyperparams")
    for name in names:
      if name not in hyper:
        raise ValueError(f"hypergradient_descent: {name!r} is not a numeric injected "
                         f"hyperparameter of tx (found {sorted(hyper)}); pass it as a number")
    zeros = {n: _zeros_like(params) for n in names}
    return HyperparamHypergradientState(inner, zeros, {n: jnp.zeros([], jnp.float32) for n in names})

  def update_fn(updates, state, params=None):
    hyper = dict(state.inner_state.hyperparams)
    h = {n: tree_vdot(updates, state.tangents[n]) for n in names}
    for n in names:
      value = hyper[n] - jnp.asarray(hyper_lrs[n], hyper[n].dtype) * h[n].astype(hyper[n].dtype)
      if n in bounds:
        value = jnp.clip(value, *bounds[n])
      hyper[n] = value
    inner = state.inner_state._replace(hyperparams=hyper)

    def update_with(n, value):
      return tx.update(updates, inner._replace(hyperparams={**hyper, n: value}), params)

    tangents, new = {}, None
    for n in names:
      # Forward mode: one extra pass through the (cheap) optimizer update per hyperparameter.
      new, (tangent, _) = jax.jvp(lambda v, n=n: update_with(n, v), (hyper[n],),
                                  (jnp.ones_like(hyper[n]),))
      tangents[n] = tangent
    new_updates, new_inner = new if new is not None else tx.update(updates, inner, params)
    return new_updates, HyperparamHypergradientState(new_inner, tangents, h)

  return optax.GradientTransformation(init_fn, update_fn)
