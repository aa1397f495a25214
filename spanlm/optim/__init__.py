"""Optimizers by name, as optax GradientTransformations."""

from __future__ import annotations

import flax.traverse_util
import jax
import optax

from spanlm.optim.schedules import make_schedule

OPTIMIZERS = ("adamw", "adam", "sgd")


def decay_mask(params):
  """True for weights that take weight decay: not LayerNorm parameters, not biases (BERT)."""
  flat = flax.traverse_util.flatten_dict(params)
  mask = {k: not (k[-1] in ("bias", "scale") or k[-1].endswith("_bias")) for k in flat}
  return flax.traverse_util.unflatten_dict(mask)


def make_optimizer(config, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`config.optimizer` + `config.schedule` -> (transformation, learning-rate schedule).

  Gradients are clipped to global norm `config.optimizer.grad_clip` (1.0 in BERT)
  before the update; `adamw` is BERT's Adam with decoupled weight decay.
  """
  opt = config.optimizer
  schedule = make_schedule(config.schedule, float(opt.learning_rate), num_steps)
  name = opt.name
  if name == "adamw":
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                     weight_decay=opt.weight_decay, mask=decay_mask)
  elif name == "adam":
    tx = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  elif name == "sgd":
    tx = optax.sgd(schedule, momentum=opt.get("momentum", 0.9) or None)
  else:
    raise ValueError(f"unknown config.optimizer.name={name!r}; choose one of {OPTIMIZERS}")
  if opt.grad_clip and opt.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
  return tx, schedule


__all__ = ["OPTIMIZERS", "decay_mask", "make_optimizer", "make_schedule"]
