"""Optimizers by name, as optax GradientTransformations, and what to log about them.

  adamw | adam | sgd     optax's, rebuilt with a learning-rate piece that records the rate used
  lamb                   You et al. 2020 (lamb.py)
  lars                   You et al. 2017 (lars.py)
  sgd_hd | adam_hd       Baydin et al. 2018 hypergradient descent (hypergradient.py)

`config.optimizer.groups` gives parameter groups their own optimizer settings
through `optax.multi_transform`: a tuple of dicts, each with a `pattern` (a
regular expression searched in the '/'-joined parameter path, e.g.
'encoder/layer_0/attention/query/kernel'), an optional `label`, and overrides of
any `config.optimizer` key (`name`, `learning_rate`, `weight_decay`, ...; name
'frozen' keeps the group fixed). The first matching group wins; the other
parameters form the group 'default' with `config.optimizer` itself. The schedule's
shape is shared; each group's peak is its own learning_rate.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

from spanlm.optim.common import (LearningRateState, decay_mask, param_path, scale_by_adam_uncorrected,
                                 scale_by_learning_rate)
from spanlm.optim.hypergradient import (HypergradientState, HyperparamHypergradientState, adam_hd,
                                        hypergradient_descent, sgd_hd)
from spanlm.optim.lamb import TrustRatioState, lamb, scale_by_trust_ratio
from spanlm.optim.lars import lars, scale_by_lars
from spanlm.optim.layer_decay import scale_by_layer_decay
from spanlm.optim.schedules import ALIASES, SCHEDULES, make_schedule

OPTIMIZERS = ("adamw", "adam", "lamb", "lars", "sgd", "sgd_hd", "adam_hd")
HYPERGRADIENT = ("sgd_hd", "adam_hd")
# Paper defaults for the hyper-learning-rate beta (Baydin et al. 2018, §4) when config.optimizer.hyper_lr is 0.
DEFAULT_HYPER_LR = {"sgd_hd": 1e-3, "adam_hd": 1e-7}
GROUP_KEYS = ("pattern", "label")  # group keys that are not config.optimizer overrides


def _adam(opt):
  if opt.get("bias_correction", True):
    return optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps)
  return scale_by_adam_uncorrected(opt.b1, opt.b2, opt.eps)  # BERT's, ELECTRA's code


def _single(opt, schedule) -> optax.GradientTransformation:
  """One optimizer from a config.optimizer-like ConfigDict (no clipping, no groups)."""
  name = opt.name
  if name == "adamw":  # optax.adamw's chain
    return optax.chain(_adam(opt),
                       optax.add_decayed_weights(opt.weight_decay, decay_mask),
                       scale_by_learning_rate(schedule))
  if name == "adam":
    return optax.chain(_adam(opt),
                       scale_by_learning_rate(schedule))
  if name == "sgd":
    return optax.chain(optax.trace(decay=opt.momentum) if opt.momentum else optax.identity(),
                       scale_by_learning_rate(schedule))
  if name == "lamb":
    return lamb(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                weight_decay_mask=decay_mask, min_norm=opt.trust_min_norm,
                max_norm=opt.trust_max_norm or None, bias_correction=opt.get("bias_correction", True))
  if name == "lars":
    return lars(schedule, momentum=opt.momentum, trust_coefficient=opt.trust_coefficient,
                weight_decay=opt.weight_decay, weight_decay_mask=decay_mask)
  if name in HYPERGRADIENT:
    beta = opt.hyper_lr or DEFAULT_HYPER_LR[name]
    if name == "sgd_hd":
      return sgd_hd(float(opt.learning_rate), beta, momentum=opt.momentum, per_tensor=opt.hd_per_tensor)
    return adam_hd(float(opt.learning_rate), beta, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                   per_tensor=opt.hd_per_tensor)
  if name == "frozen":
    return optax.set_to_zero()
  raise ValueError(f"unknown config.optimizer.name={name!r}; choose one of {OPTIMIZERS}")


def group_labels(groups, params) -> dict:
  """Tree of group labels like `params`: the first group whose pattern matches the path, else 'default'."""
  patterns = [(re.compile(g["pattern"]), group_label(g, i)) for i, g in enumerate(groups)]
  used = set()

  def label(path, _):
    p = param_path(path)
    for pattern, name in patterns:
      if pattern.search(p):
        used.add(name)
        return name
    return "default"

  labels = jax.tree_util.tree_map_with_path(label, params)
  if jax.tree.leaves(params):  # (optax.tree_map_params initialises with an empty placeholder)
    for i, (pattern, name) in enumerate(patterns):
      if name not in used:
        example = param_path(jax.tree_util.tree_flatten_with_path(params)[0][0][0])
        raise ValueError(f"config.optimizer.groups[{i}] pattern {pattern.pattern!r} matches no "
                         f"parameter (or only ones an earlier group took); paths look like {example!r}")
  return labels


def group_label(group, i: int) -> str:
  return str(group.get("label") or f"group{i}")


def make_optimizer(config, num_steps: int, num_layers: int = 0, schedule=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`config.optimizer` + `config.schedule` -> (transformation, default group's schedule).

  Gradients are clipped to global norm `config.optimizer.grad_clip` (1.0 in BERT)
  before the update; `adamw` is BERT's Adam with decoupled weight decay. Fine-tuning
  configs may set `optimizer.layer_decay` (needs `num_layers`; optim/layer_decay.py) and
  `optimizer.bias_correction=False` (BERT's Adam; optim/common.scale_by_adam_uncorrected).
  """
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"unknown config.optimizer.name={opt.name!r}; choose one of {OPTIMIZERS}")
  # `schedule` (a function of the step) replaces config.schedule, e.g. the LR range test's ramp;
  # groups then follow it scaled by their learning_rate / optimizer.learning_rate.
  base_rate = float(opt.learning_rate)
  given = schedule
  schedule = given or make_schedule(config.schedule, base_rate, num_steps)
  group_schedule = (lambda rate: (lambda step: given(step) * (rate / base_rate))) if given else \
      (lambda rate: make_schedule(config.schedule, rate, num_steps))
  groups = tuple(opt.get("groups", ()) or ())
  if not groups:
    tx = _single(opt, schedule)
  else:
    transforms = {"default": _single(opt, schedule)}
    for i, group in enumerate(groups):
      sub = ml_collections.ConfigDict(opt.to_dict())
      sub.groups = ()
      sub.update({k: v for k, v in group.items() if k not in GROUP_KEYS})
      transforms[group_label(group, i)] = _single(sub, group_schedule(float(sub.learning_rate)))
    tx = optax.multi_transform(transforms, lambda params: group_labels(groups, params))
  if opt.get("layer_decay", 1.0) != 1.0:  # fine-tuning: lr * d^(L+2-depth) (optim/layer_decay.py)
    if any(g.get("name", opt.name) in HYPERGRADIENT for g in (opt, *groups)):
      raise ValueError(f"invalid config: config.optimizer.layer_decay needs a fixed-rate optimizer, "
                       f"not {opt.name!r} (it adapts its own rate)")
    if not num_layers:
      raise ValueError("config.optimizer.layer_decay needs the encoder's number of layers "
                       "(make_optimizer(config, num_steps, num_layers=...))")
    tx = optax.chain(tx, scale_by_layer_decay(num_layers, float(opt.layer_decay)))
  if opt.grad_clip and opt.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
  return tx, schedule


def opt_state_shardings(tx, abstract_opt_state, param_shardings, replicated):
  """Shardings for an optimizer state: parameter-like trees as the parameters, the rest replicated.

  Parameter groups (optax.multi_transform) leave empty `MaskedNode`s where another group's
  parameters are; they stay empty here.
  """
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return optax.tree_map_params(
      tx, lambda v, s: v if masked(v) else s, abstract_opt_state, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: masked(x) or isinstance(x, jax.sharding.Sharding))


def optimizer_metrics(opt_state) -> dict[str, jax.Array]:
  """Scalars worth logging, found by walking the state: the learning rate each group used,
  trust-ratio min/mean/max (LAMB, LARS), adapted rates and hypergradients (sgd_hd, adam_hd,
  hypergradient_descent). Keys of group g are prefixed 'g/'."""
  out, ratios = {}, {}

  def walk(node, prefix):
    if isinstance(node, optax.MultiTransformState):
      for label, inner in node.inner_states.items():
        walk(inner, f"{prefix}{label}/")
      return
    if isinstance(node, LearningRateState):
      out[f"{prefix}learning_rate"] = node.learning_rate
    elif isinstance(node, TrustRatioState):
      ratios.setdefault(prefix, []).append(node.trust_ratio)
    elif isinstance(node, HypergradientState):
      out[f"{prefix}learning_rate"] = jnp.mean(node.learning_rate)
      out[f"{prefix}hypergradient"] = jnp.mean(node.hypergradient)
      if node.learning_rate.ndim:  # per tensor
        out[f"{prefix}learning_rate_min"] = jnp.min(node.learning_rate)
        out[f"{prefix}learning_rate_max"] = jnp.max(node.learning_rate)
    elif isinstance(node, HyperparamHypergradientState):
      for name, h in node.hypergradients.items():
        out[f"{prefix}hd/{name}"] = node.inner_state.hyperparams[name]
        out[f"{prefix}hd/{name}_hypergradient"] = h
    if isinstance(node, (tuple, list)):
      for child in node:
        walk(child, prefix)
    elif isinstance(node, dict):
      for child in node.values():
        walk(child, prefix)

  walk(opt_state, "")
  for prefix, parts in ratios.items():
    r = jnp.concatenate([jnp.ravel(p) for p in parts])
    if r.size:
      out.update({f"{prefix}trust_ratio/min": jnp.min(r), f"{prefix}trust_ratio/mean": jnp.mean(r),
                  f"{prefix}trust_ratio/max": jnp.max(r)})
  return out


__all__ = ["ALIASES", "OPTIMIZERS", "SCHEDULES", "adam_hd", "decay_mask", "group_labels",
           "hypergradient_descent", "lamb", "lars", "make_optimizer", "make_schedule", "opt_state_shardings",
           "optimizer_metrics", "scale_by_lars", "scale_by_learning_rate", "scale_by_trust_ratio",
           "sgd_hd"]
