"""BERT's fine-tuning Adam: Adam's moments without bias correction (google-research/bert
`optimization.py::AdamWeightDecayOptimizer`).

  m_t = b1 m_{t-1} + (1 - b1) g_t,   v_t = b2 v_{t-1} + (1 - b2) g_t^2,   u_t = m_t / (sqrt(v_t) + eps)

Kingma & Ba's Adam divides m_t by (1 - b1^t) and v_t by (1 - b2^t); BERT's does not, so its
first steps are smaller (at t = 1 the step is (1 - b1) / sqrt(1 - b2) = 3.16x smaller per
coordinate with b1 = 0.9, b2 = 0.999), acting as extra warmup. Select it with
`config.optimizer.bias_correction=False` (adam, adamw).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def scale_by_adam_without_bias_correction(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6
                                          ) -> optax.GradientTransformation:
  """u <- m_t / (sqrt(v_t) + eps), moments not bias-corrected (state: optax.ScaleByAdamState)."""

  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    return out, optax.ScaleByAdamState(count=optax.safe_increment(state.count), mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
