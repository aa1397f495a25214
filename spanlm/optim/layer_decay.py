"""Layer-wise learning-rate decay for fine-tuning (ELECTRA, Clark et al. 2020, §A; google-research/electra
`model/optimization.py::_get_layer_lrs`).

With L encoder layers and decay factor d, parameter p at depth k(p) trains at

  lr(p) = lr * d ** (L + 2 - k(p)),   k = 0 for the embeddings, i + 1 for encoder layer i,
                                      L + 1 for the pooler, L + 2 for the task's head,

so the embeddings get the lowest rate and the head the full one (ELECTRA uses d = 0.8 for
Base, 0.9 for Large). ELECTRA's key table has no pooler; it sits here between the top layer
and the head.

The per-parameter factor is applied by scaling the optimizer's final update. Every
fixed-rate optimizer here applies the learning rate linearly after its direction (Adam(W),
LAMB, SGD) or before a linear momentum (LARS), so scaling the update by a constant
factor is the same optimizer at rate lr * factor; rate-adapting optimizers (sgd_hd,
adam_hd) are refused.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spanlm.optim.common import param_path

_LAYER = re.compile(r"(?:^|/)layer_(\d+)(?:/|$)")
_SCANNED = re.compile(r"^encoder/(?:.*/)?layers(?:/|$)")  # scan_layers: leaves stacked [num_layers, ...]


def layer_depth(path: str, num_layers: int) -> int:
  """k(p) for a '/'-joined parameter path (see the module docstring)."""
  parts = path.split("/")
  if parts[0] != "encoder":
    return num_layers + 2  # task-specific head
  if "embeddings" in parts:
    return 0
  m = _LAYER.search(path)
  if m:
    return int(m.group(1)) + 1
  return num_layers + 1  # pooler (and any other encoder-top parameter)


def layer_decay_factors(params, num_layers: int, decay: float):
  """A tree like `params` of factors d ** (L + 2 - k(p)): floats, or for the stacked parameters of
  scanned layers an array [num_layers, 1, ...] with layer i's factor d ** (L + 1 - i)."""

  def factor(path, leaf):
    path = param_path(path)
    if _SCANNED.search(path):
      per_layer = float(decay) ** (num_layers + 1 - np.arange(num_layers, dtype=np.float64))
      return per_layer.reshape((num_layers,) + (1,) * (np.ndim(leaf) - 1))
    return float(decay) ** (num_layers + 2 - layer_depth(path, num_layers))

  return jax.tree_util.tree_map_with_path(factor, params)


def scale_by_layer_decay(num_layers: int, decay: float) -> optax.GradientTransformation:
  """u_p <- d ** (L + 2 - k(p)) * u_p (stateless)."""
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"invalid config: config.optimizer.layer_decay={decay} must be in (0, 1]")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    factors = layer_decay_factors(updates, num_layers, decay)
    return jax.tree.map(lambda u, f: (u * jnp.asarray(f, u.dtype)), updates, factors), state

  return optax.GradientTransformation(init_fn, update_fn)


def describe(params, num_layers: int, decay: float) -> str:
  """'embeddings x0.41, layer_0 x0.51, ..., head x1' for the log."""
  seen = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    if _SCANNED.search(param_path(path)):
      for k in range(1, num_layers + 1):
        seen.setdefault(k, float(decay) ** (num_layers + 2 - k))
      continue
    k = layer_depth(param_path(path), num_layers)
    seen.setdefault(k, float(decay) ** (num_layers + 2 - k))
  names = {0: "embeddings", num_layers + 1: "pooler", num_layers + 2: "head"}
  return ", ".join(f"{names.get(k, f'layer_{k - 1}')} x{v:.3g}" for k, v in sorted(seen.items()))

