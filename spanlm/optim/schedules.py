"""Learning-rate schedules chosen by `config.schedule.name`."""

from __future__ import annotations

import optax


def make_schedule(schedule_cfg, learning_rate: float, num_steps: int) -> optax.Schedule:
  """BERT's schedule by default: linear warmup to `learning_rate`, then linear decay to 0.

  Names: 'linear' (warmup + linear decay, Devlin et al. 2019), 'cosine'
  (warmup + cosine decay), 'constant' (warmup then flat).
  """
  name = schedule_cfg.name
  warmup = int(schedule_cfg.warmup_steps)
  if warmup < 0 or warmup > num_steps:
    raise ValueError(f"config.schedule.warmup_steps={warmup} must be in [0, num_steps={num_steps}]")
  ramp = optax.linear_schedule(0.0, learning_rate, max(warmup, 1))
  rest = max(num_steps - warmup, 1)
  if name == "linear":
    after = optax.linear_schedule(learning_rate, 0.0, rest)
  elif name == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, rest)
  elif name == "constant":
    after = optax.constant_schedule(learning_rate)
  else:
    raise ValueError(f"unknown config.schedule.name={name!r}; choose 'linear', 'cosine' or 'constant'")
  if warmup == 0:
    return after
  return optax.join_schedules([ramp, after], [warmup])
