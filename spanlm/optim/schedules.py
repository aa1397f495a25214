"""Learning-rate schedules chosen by `config.schedule.name`.

With peak eta_max = config.optimizer.learning_rate, floor/base eta_min =
config.schedule.min_learning_rate, W = warmup_steps, T = num_steps, step t:

  warmup_linear  t < W: eta_max t / W; then eta_max -> eta_min linearly over T - W
                 (BERT, Devlin et al. 2019; alias 'linear')
  warmup_poly    t < W: eta_max t / W; then eta_min + (eta_max - eta_min)(1 - (t - W)/(T - W))^power
                 (BERT/LAMB's polynomial decay; power 1 is warmup_linear, LARS uses 2)
  warmup_cosine  t < W: eta_max t / W; then cosine eta_max -> eta_min (alias 'cosine')
  constant       t < W: eta_max t / W; then eta_max

Smith 2017 ("Cyclical Learning Rates for Training Neural Networks", WACV), with
half-cycle ("step size") s = cycle_steps, no warmup:

  cycle = floor(1 + t / (2 s)),  x = |t / s - 2 cycle + 1|
  triangular     eta_min + (eta_max - eta_min) max(0, 1 - x)
  triangular2    ... amplitude halved each cycle: / 2^(cycle - 1)
  exp_range      ... amplitude times gamma^t

Smith & Topin 2019 ("Super-Convergence", 1cycle), with a = pct_start T:
  onecycle       eta_min -> eta_max linearly over a steps, eta_max -> eta_min over the next a,
                 then eta_min -> eta_min / final_div_factor over the rest ("annihilation").
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ("warmup_linear", "warmup_poly", "warmup_cosine", "triangular", "triangular2",
             "exp_range", "onecycle", "constant")
ALIASES = {"linear": "warmup_linear", "cosine": "warmup_cosine"}
CYCLICAL = ("triangular", "triangular2", "exp_range", "onecycle")


def cyclical(base_lr: float, max_lr: float, step_size: int, mode: str = "triangular",
             gamma: float = 1.0) -> optax.Schedule:
  """Smith's cyclical learning rate (triangular | triangular2 | exp_range)."""
  if step_size <= 0:
    raise ValueError(f"cyclical schedule: step_size (config.schedule.cycle_steps)={step_size} must be positive")

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    cycle = jnp.floor(1 + t / (2 * step_size))
    x = jnp.abs(t / step_size - 2 * cycle + 1)
    amplitude = (max_lr - base_lr) * jnp.maximum(0.0, 1 - x)
    if mode == "triangular2":
      amplitude = amplitude / 2.0 ** (cycle - 1)
    elif mode == "exp_range":
      amplitude = amplitude * gamma ** t
    return base_lr + amplitude

  return schedule


def onecycle(base_lr: float, max_lr: float, num_steps: int, pct_start: float = 0.45,
             final_div_factor: float = 100.0) -> optax.Schedule:
  """Smith & Topin's 1cycle: up, down (symmetric), then annihilation to base / final_div_factor."""
  up = max(int(round(pct_start * num_steps)), 1)
  rest = max(num_steps - 2 * up, 1)
  return optax.join_schedules(
      [optax.linear_schedule(base_lr, max_lr, up), optax.linear_schedule(max_lr, base_lr, up),
       optax.linear_schedule(base_lr, base_lr / final_div_factor, rest)], [up, 2 * up])


def make_schedule(schedule_cfg, learning_rate: float, num_steps: int) -> optax.Schedule:
  """The schedule `schedule_cfg.name` peaking at `learning_rate` over `num_steps` (see module doc)."""
  name = ALIASES.get(schedule_cfg.name, schedule_cfg.name)
  if name not in SCHEDULES:
    raise ValueError(f"unknown config.schedule.name={schedule_cfg.name!r}; choose one of "
                     f"{SCHEDULES} (or the aliases {tuple(ALIASES)})")
  floor = float(schedule_cfg.get("min_learning_rate", 0.0))
  if name in CYCLICAL:
    steps = int(schedule_cfg.get("cycle_steps", 0)) or max(num_steps // 2, 1)
    if name == "onecycle":
      return onecycle(floor, learning_rate, num_steps, float(schedule_cfg.get("pct_start", 0.45)),
                      float(schedule_cfg.get("final_div_factor", 100.0)))
    return cyclical(floor, learning_rate, steps, name, float(schedule_cfg.get("gamma", 1.0)))
  warmup = int(schedule_cfg.warmup_steps)
  if warmup < 0 or warmup > num_steps:
    raise ValueError(f"config.schedule.warmup_steps={warmup} must be in [0, num_steps={num_steps}]")
  rest = max(num_steps - warmup, 1)
  if name == "warmup_linear":
    after = optax.linear_schedule(learning_rate, floor, rest)
  elif name == "warmup_poly":
    after = optax.polynomial_schedule(learning_rate, floor, float(schedule_cfg.get("power", 1.0)), rest)
  elif name == "warmup_cosine":
    after = optax.cosine_decay_schedule(learning_rate, rest, alpha=floor / learning_rate)
  else:
    after = optax.constant_schedule(learning_rate)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup), after], [warmup])
