"""Small pieces shared by the optimizers: a logged learning-rate scaling, mask checks.

`scale_by_learning_rate` is optax's `u <- -eta_t u` with the rate used in the
last update kept in the state, so `optimizer_metrics` can log the rate each
parameter group actually used (a schedule is a function and cannot be found by
walking the state).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp
import optax


def param_path(path) -> str:
  """'encoder/layer_0/attention/query/kernel' for a jax tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def scale_by_adam_uncorrected(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """Adam's moments WITHOUT bias correction, u = m_t / (sqrt(v_t) + eps): google-research/bert's
  `AdamWeightDecayOptimizer` (also ELECTRA's) and ALBERT's `lamb_optimizer.py`, which the papers
  call Adam and LAMB (both of which correct the bias)."""

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return out, optax.ScaleByAdamState(count=optax.safe_int32_increment(state.count), mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


class LearningRateState(NamedTuple):
  count: jax.Array  # int32: updates applied so far (the schedule's argument)
  learning_rate: jax.Array  # float32: eta_t used in the last update (0 before the first)


def scale_by_learning_rate(learning_rate: optax.ScalarOrSchedule, *, flip_sign: bool = True
                           ) -> optax.GradientTransformation:
  """u <- -eta_t u (or +eta_t u with flip_sign=False), eta_t = learning_rate(count)."""
  sign = -1.0 if flip_sign else 1.0

  def init_fn(params):
    del params
    return LearningRateState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    lr = jnp.asarray(lr, jnp.float32)
    updates = jax.tree.map(lambda u: (sign * lr).astype(u.dtype) * u, updates)
    return updates, LearningRateState(optax.safe_increment(state.count), lr)

  return optax.GradientTransformation(init_fn, update_fn)


def decay_mask(params):
  """True for weights that take weight decay: not LayerNorm parameters, not biases (BERT).

  The same leaves are excluded from LAMB/LARS's trust ratio, as in ALBERT's LAMB
  (`exclude_from_layer_adaptation` defaults to `exclude_from_weight_decay`).
  """
  flat = flax.traverse_util.flatten_dict(params)
  mask = {k: not (k[-1] in ("bias", "scale") or k[-1].endswith("_bias")) for k in flat}
  return flax.traverse_util.unflatten_dict(mask)


def all_true(params):
  """A mask selecting every leaf."""
  return jax.tree.map(lambda _: True, params)


def check_mask(mask: Any, params: Any, field: str) -> None:
  """Raise ValueError naming `field` when a mask (tree or callable) does not match `params`.

  A mask may be a prefix of the parameter tree (optax's rule), e.g. `{'encoder': True, ...}`.
  """
  if mask is None or not jax.tree.leaves(params):  # nothing to check (or optax's placeholder)
    return
  tree = mask(params) if callable(mask) else mask
  try:
    jax.tree.map(lambda m, p: None, tree, params, is_leaf=lambda x: isinstance(x, bool))
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{field} does not match the parameter tree: its structure "
        f"{jax.tree.structure(tree)} is not a prefix of the parameters' "
        f"{jax.tree.structure(params)}; build it from the parameters (or pass a callable "
        f"params -> mask)") from e
  for leaf in jax.tree.leaves(tree):
    if not isinstance(leaf, (bool, jnp.bool_)) and getattr(leaf, "dtype", None) != jnp.bool_:
      raise ValueError(f"{field} must hold booleans, found {leaf!r}")


def with_mask_checks(tx: optax.GradientTransformation, optimizer: str, **masks
                     ) -> optax.GradientTransformation:
  """`tx` whose init first checks each named mask against the parameters."""
  def init_fn(params):
    for field, mask in masks.items():
      check_mask(mask, params, f"{optimizer}: {field}")
    return tx.init(params)

  return tx._replace(init=init_fn)


def tree_vdot(a, b) -> jax.Array:
  """Sum over leaves of <a_l, b_l>, accumulated in float32."""
  parts = jax.tree.leaves(jax.tree.map(
      lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b))
  return sum(parts, jnp.zeros([], jnp.float32))


def mask_leaves(mask: Any, params: Any) -> list[bool]:
  """The mask (None = all, tree or callable, possibly a prefix) as one bool per parameter leaf."""
  if mask is None:
    return [True] * len(jax.tree.leaves(params))
  tree = mask(params) if callable(mask) else mask
  full = jax.tree.map(lambda m, p: jax.tree.map(lambda _: bool(m), p), tree, params,
                      is_leaf=lambda x: isinstance(x, bool))
  return jax.tree.leaves(full)


def check_hyperparams(optimizer: str, learning_rate=None, **unit_interval) -> None:
  """ValueError naming the argument for a non-positive rate or a decay outside [0, 1)."""
  if learning_rate is not None and not callable(learning_rate) and not float(learning_rate) > 0:
    raise ValueError(f"{optimizer}: learning_rate={learning_rate} must be positive")
  for name, value in unit_interval.items():
    if not callable(value) and not 0.0 <= float(value) < 1.0:
      raise ValueError(f"{optimizer}: {name}={value} must be in [0, 1)")
