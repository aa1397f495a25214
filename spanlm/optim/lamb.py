"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT
in 76 minutes", ICLR, arXiv:1904.00962), Algorithm 2, and its trust-ratio piece.

Per layer (parameter leaf) l, with gradient g_t:

  m_t = b1 m_{t-1} + (1 - b1) g_t            v_t = b2 v_{t-1} + (1 - b2) g_t^2
  m^_t = m_t / (1 - b1^t)                    v^_t = v_t / (1 - b2^t)
  r_t = m^_t / (sqrt(v^_t) + eps)
  x_{t+1} = x_t - eta_t * phi(||x_t||) / ||r_t + lambda x_t|| * (r_t + lambda x_t)

phi(z) = clip(z, min_norm, max_norm) (the paper's gamma_l, gamma_u); the ratio is 1
when ||x_t|| or ||r_t + lambda x_t|| is 0 (a zero-initialised layer would never move).

Built as optax builds its own LAMB, a chain of small transformations:
scale_by_adam -> add_decayed_weights -> scale_by_trust_ratio -> scale_by_learning_rate.
The difference from `optax.lamb`: masked leaves (LayerNorm, biases by default in
`make_optimizer`) get neither weight decay nor the trust ratio, as in ALBERT's LAMB
(`exclude_from_layer_adaptation` defaults to `exclude_from_weight_decay`), while
`optax.lamb(mask=...)` masks only the decay and applies the ratio to every leaf.

A leaf under a `layers` key holds one tensor per layer stacked on its first axis (scanned
layers, spanlm.models.bert): its trust ratios are taken per slice, one per layer, as for the
unrolled `layer_i` tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from spanlm.optim.common import (check_hyperparams, scale_by_adam_uncorrected, scale_by_learning_rate,
                                 with_mask_checks)


class TrustRatioState(NamedTuple):
  trust_ratio: jax.Array  # (layers,) float32: ratio applied to each (unmasked) layer in the last update


STACKED_KEY = "layers"  # parameters under this key are stacked per layer on their first axis


def stacked_leaves(tree) -> list[bool]:
  """Per leaf of `tree`: does it lie under a `layers` key (one tensor per layer on axis 0)?"""
  return [any(isinstance(k, jax.tree_util.DictKey) and k.key == STACKED_KEY for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def num_ratios(params, flags=None) -> int:
  """How many trust ratios `params` get: one per leaf, one per layer for stacked leaves."""
  leaves = jax.tree.leaves(params)
  stacked = stacked_leaves(params)
  flags = [True] * len(leaves) if flags is None else flags
  return sum((x.shape[0] if s else 1) for x, s, f in zip(leaves, stacked, flags) if f)


def layer_norms(update, param, min_norm=0.0, max_norm=None, stacked: bool = False):
  """(||u||, phi(||w||), raw ||w||) in float32; per slice of axis 0 (shape [n, 1, ...]) if stacked."""
  axes = tuple(range(1, param.ndim)) if stacked else None
  w = jnp.sqrt(jnp.sum(jnp.square(param.astype(jnp.float32)), axis=axes, keepdims=stacked))
  u = jnp.sqrt(jnp.sum(jnp.square(update.astype(jnp.float32)), axis=axes, keepdims=stacked))
  phi = jnp.clip(w, min_norm, max_norm)
  return u, phi, w


def scale_by_trust_ratio(min_norm: float = 0.0, max_norm: float | None = None,
                         trust_coefficient: float = 1.0, eps: float = 0.0
                         ) -> optax.GradientTransformation:
  """u_l <- ratio_l u_l, ratio_l = trust_coefficient * phi(||w_l||) / (||u_l|| + eps).

  phi clips ||w_l|| to [min_norm, max_norm]; the ratio is 1 when ||w_l|| or ||u_l|| is 0.
  The ratios of the last update are kept in the state, one per leaf, for logging.
  Wrap in `optax.masked` to apply it to some leaves only.
  """
  def init_fn(params):
    return TrustRatioState(jnp.ones([num_ratios(params)], jnp.float32))

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    leaves, treedef = jax.tree.flatten(updates)
    ratios, scaled = [], []
    for u, w, stacked in zip(leaves, treedef.flatten_up_to(params), stacked_leaves(updates)):
      u_norm, phi, w_norm = layer_norms(u, w, min_norm, max_norm, stacked)
      ratio = trust_coefficient * phi / (u_norm + eps)
      ratio = jnp.where((w_norm == 0) | (u_norm == 0), 1.0, ratio)
      ratios.append(ratio.ravel())
      scaled.append(u * ratio.astype(u.dtype))
    ratios = jnp.concatenate(ratios) if ratios else state.trust_ratio
    return treedef.unflatten(scaled), TrustRatioState(ratios)

  return optax.GradientTransformation(init_fn, update_fn)


def lamb(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-6, weight_decay: float = 0.0, weight_decay_mask=None,
         trust_ratio_mask=None, min_norm: float = 0.0, max_norm: float | None = None,
         eps_root: float = 0.0, bias_correction: bool = True) -> optax.GradientTransformation:
  """LAMB (You et al. 2020, Algorithm 2) with ALBERT's exclusions.

  Args:
    learning_rate: eta_t, a float or an optax schedule.
    b1, b2, eps, eps_root: Adam's moment decays and denominators (as `optax.scale_by_adam`).
    weight_decay: lambda, decoupled (added to the Adam direction before the trust ratio).
    weight_decay_mask: None (every leaf), a tree of bools (or a prefix of the parameter
      tree), or a callable params -> such a tree: True where weight decay applies.
    trust_ratio_mask: the same for the trust ratio; None = `weight_decay_mask` (ALBERT),
      True = every leaf (`optax.lamb`).
    min_norm, max_norm: phi's bounds on ||w|| (gamma_l, gamma_u in the paper; None = no upper bound).
  """
  check_hyperparams("lamb", learning_rate, b1=b1, b2=b2)
  if trust_ratio_mask is None:
    trust_ratio_mask = weight_decay_mask
  trust = scale_by_trust_ratio(min_norm, max_norm)
  if trust_ratio_mask is not None and trust_ratio_mask is not True:
    trust = optax.masked(trust, trust_ratio_mask)
  tx = optax.chain(
      (optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root) if bias_correction
       else scale_by_adam_uncorrected(b1, b2, eps)),  # ALBERT's lamb_optimizer.py: uncorrected
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      trust,
      scale_by_learning_rate(learning_rate))
  return with_mask_checks(tx, "lamb", weight_decay_mask=weight_decay_mask,
                          trust_ratio_mask=None if trust_ratio_mask is True else trust_ratio_mask)
