"""LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional
Networks", arXiv:1708.03888), Algorithm 1.

Per layer l, with global rate gamma_t, momentum m, weight decay beta and trust
coefficient eta:

  g = grad L(w_t^l)
  lambda^l = eta * ||w_t^l|| / (||g|| + beta ||w_t^l||)          (local learning rate)
  v_{t+1}^l = m v_t^l + gamma_t * lambda^l * (g + beta w_t^l)
  w_{t+1}^l = w_t^l - v_{t+1}^l

The denominator is the paper's ||g|| + beta ||w|| (as in the TF/MLPerf LARS), not
||g + beta w|| (`optax.lars`). The global rate sits inside the momentum, as in the
paper, so a schedule changes only new contributions. lambda^l is 1 when ||w|| or
||g|| is 0. Leaves outside `trust_ratio_mask` take gamma_t (g + beta_l w); leaves
outside `weight_decay_mask` take beta_l = 0.

Composition: scale_by_lars -> scale_by_learning_rate -> trace(m).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from spanlm.optim.common import (check_hyperparams, mask_leaves, scale_by_learning_rate,
                                 with_mask_checks)
from spanlm.optim.lamb import TrustRatioState, layer_norms, num_ratios, stacked_leaves


def scale_by_lars(trust_coefficient: float = 0.001, weight_decay: float = 0.0, eps: float = 0.0,
                  weight_decay_mask=None, trust_ratio_mask=None) -> optax.GradientTransformation:
  """u_l <- lambda_l (u_l + beta_l w_l), lambda_l = eta ||w_l|| / (||u_l|| + beta_l ||w_l|| + eps).

  The ratios of the last update (leaves in `trust_ratio_mask` only) are kept in the state.
  """
  def init_fn(params):
    n = num_ratios(params, mask_leaves(trust_ratio_mask, params)) if jax.tree.leaves(params) else 0
    return TrustRatioState(jnp.ones([n], jnp.float32))

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    leaves, treedef = jax.tree.flatten(updates)
    ws = treedef.flatten_up_to(params)
    decays, trusts = mask_leaves(weight_decay_mask, params), mask_leaves(trust_ratio_mask, params)
    ratios, out = [], []
    for g, w, decay, trust, stacked in zip(leaves, ws, decays, trusts, stacked_leaves(updates)):
      beta = weight_decay if decay else 0.0
      u = g + beta * w
      if trust:  # per layer, also for stacked (scanned) layers
        g_norm, w_norm, _ = layer_norms(g, w, stacked=stacked)
        ratio = trust_coefficient * w_norm / (g_norm + beta * w_norm + eps)
        ratio = jnp.where((w_norm == 0) | (g_norm == 0), 1.0, ratio)
        ratios.append(ratio.ravel())
        u = u * ratio.astype(u.dtype)
      out.append(u)
    ratios = jnp.concatenate(ratios) if ratios else state.trust_ratio
    return treedef.unflatten(out), TrustRatioState(ratios)

  return optax.GradientTransformation(init_fn, update_fn)


def lars(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9,
         trust_coefficient: float = 0.001, weight_decay: float = 0.0, weight_decay_mask=None,
         trust_ratio_mask=None, eps: float = 0.0, nesterov: bool = False
         ) -> optax.GradientTransformation:
  """LARS (You et al. 2017, Algorithm 1).

  Args:
    learning_rate: the global rate gamma_t (the paper uses gamma_0 (1 - t/T)^2: warmup_poly, power 2).
    momentum: m. trust_coefficient: eta. weight_decay: beta.
    weight_decay_mask, trust_ratio_mask: None (every leaf), a tree of bools (or a prefix), or a
      callable params -> tree; trust_ratio_mask=None follows weight_decay_mask (as ALBERT/LAMB).
    eps: added to the ratio's denominator.
  """
  check_hyperparams("lars", learning_rate, momentum=momentum)
  if trust_ratio_mask is None:
    trust_ratio_mask = weight_decay_mask
  tx = optax.chain(
      scale_by_lars(trust_coefficient, weight_decay, eps, weight_decay_mask, trust_ratio_mask),
      scale_by_learning_rate(learning_rate),
      optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity())
  return with_mask_checks(tx, "lars", weight_decay_mask=weight_decay_mask,
                          trust_ratio_mask=trust_ratio_mask)
