r"""Smith's learning-rate range test ("Cyclical Learning Rates for Training Neural Networks", 2017, §3.3).

Train for N steps while the learning rate grows exponentially from `min_lr` to
`max_lr`,

  lr_i = min_lr * (max_lr / min_lr) ** (i / (N - 1)),

record the loss, and read off the range over which the loss falls. The raw
per-batch loss is noisy, so it is smoothed by an exponential moving average
with Adam-style bias correction (the average starts at 0):

  m_i = beta * m_{i-1} + (1 - beta) * loss_i,     smoothed_i = m_i / (1 - beta ** (i + 1)).

The test stops early once the loss diverges: smoothed_i > factor * min_j<=i smoothed_j,
or, for losses bounded by their untrained value (cross-entropy starts near
log(vocab) and rarely reaches 4x its best), once the smoothed loss has fallen
by more than 10% and then climbed back above where it started. The EMA lags
the raw loss by about 1 / (1 - beta) steps, so beta should keep that window a
small part of a decade of LR (0.9 = 10 steps; 300 steps over 6 decades = 50
steps per decade).

The suggested range: the top of the useful range is where the smoothed loss is
lowest; training right at that LR is already on the edge of divergence, so the
suggested maximum is one decade below it (lr_at_min_loss / 10, the usual
reading of the test), and the suggested minimum is a quarter of that (Smith
§3.3: "set base_lr as 1/3 or 1/4 of the maximum learning rate"). The LR of
steepest descent of the smoothed loss in log(lr) is reported too, as a second
opinion.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from absl import logging


def exponential_lrs(min_lr: float, max_lr: float, num_steps: int) -> np.ndarray:
  """The learning rate of each of `num_steps` steps, geometric from min_lr to max_lr inclusive."""
  if not 0 < min_lr < max_lr:
    raise ValueError(f"need 0 < min_lr < max_lr, got min_lr={min_lr}, max_lr={max_lr}")
  if num_steps < 2:
    raise ValueError(f"num_steps={num_steps} must be at least 2")
  return min_lr * (max_lr / min_lr) ** (np.arange(num_steps) / (num_steps - 1))


def smooth(losses, beta: float = 0.9) -> np.ndarray:
  """Bias-corrected exponential moving average of `losses` (see the module docstring)."""
  if not 0 <= beta < 1:
    raise ValueError(f"smoothing beta={beta} must be in [0, 1)")
  out, m = np.empty(len(losses)), 0.0
  for i, loss in enumerate(losses):
    m = beta * m + (1 - beta) * float(loss)
    out[i] = m / (1 - beta ** (i + 1))
  return out


def diverged(smoothed: float, best: float, factor: float = 4.0, start: float | None = None) -> bool:
  """True when the smoothed loss is non-finite, above `factor` x the best seen, or (given the
  starting loss `start`) back above the start after having fallen below 0.9 x start."""
  if not np.isfinite(smoothed) or smoothed > factor * best:
    return True
  return start is not None and best < 0.9 * start and smoothed > start


def suggest_range(lrs, smoothed, skip_start: int = 0) -> dict:
  """Suggested cyclical-LR bounds from an LR range test's smoothed loss curve.

  `skip_start` ignores the first points, where the moving average has not
  settled. Returns suggested_min_lr, suggested_max_lr, min_loss_lr and
  steepest_lr (all floats). With fewer than 3 points after `skip_start` the skip
  shrinks; with fewer than 3 points in all, the suggestion is read off what there
  is (steepest_lr = min_loss_lr) and a warning says it is unreliable.
  """
  lrs, smoothed = np.asarray(lrs, float), np.asarray(smoothed, float)
  if len(lrs) != len(smoothed):
    raise ValueError(f"{len(lrs)} learning rates but {len(smoothed)} losses")
  if len(lrs) == 0:
    raise ValueError("an LR range test with no recorded step has nothing to suggest")
  skip = min(skip_start, max(len(lrs) - 3, 0))
  lrs, smoothed = lrs[skip:], smoothed[skip:]
  finite = np.isfinite(smoothed)
  best = int(np.argmin(np.where(finite, smoothed, np.inf)))
  if len(lrs) < 3:
    logging.warning("LR range test: only %d usable point(s); the suggested range is unreliable (run more "
                    "steps, or lower --min_lr if the loss blew up at once)", len(lrs))
    steepest = best
  else:
    # Steepest descent of the smoothed loss against log(lr), before the minimum.
    stop = max(best, 2)
    slope = np.gradient(smoothed[:stop + 1], np.log(lrs[:stop + 1]))
    steepest = int(np.argmin(slope[:stop]))
  max_lr = float(lrs[best] / 10)
  return dict(suggested_min_lr=max_lr / 4, suggested_max_lr=max_lr, min_loss_lr=float(lrs[best]),
              steepest_lr=float(lrs[steepest]))


def ramp_optimizer(config, lrs):
  """(tx, schedule): the configured optimizer with its learning rate at step t set to lrs[t].

  The ramp is the optimizer's own learning-rate schedule, so each optimizer applies it
  where it applies any rate: after Adam's direction and weight decay, after LAMB's trust
  ratio, and before LARS's and SGD's momentum (LARS at rate lrs[t] is exactly LARS with
  that schedule; scaling the final update instead would rescale the whole momentum).
  Parameter groups keep their ratio to config.optimizer.learning_rate. Pass it to
  Trainer(..., optimizer=...).
  """
  import jax.numpy as jnp
  from spanlm.optim import HYPERGRADIENT, make_optimizer

  if config.optimizer.name in HYPERGRADIENT:
    raise ValueError(f"config.optimizer.name={config.optimizer.name!r} adapts its own learning rate; "
                     "an LR range test needs a fixed-rate optimizer (adamw, adam, lamb, lars, sgd)")
  table = jnp.asarray(lrs, jnp.float32)
  schedule = lambda step: table[jnp.minimum(step, len(table) - 1)]
  tx, _ = make_optimizer(config, len(lrs), schedule=schedule)
  return tx, schedule


def run(step: Callable[[int, float], float], lrs, beta: float = 0.9, factor: float = 4.0,
        skip_start: int = 10, log: Callable[[str], None] | None = None) -> dict:
  """Run the range test: `step(i, lr)` takes one training step at `lr` and returns its loss.

  Stops when the smoothed loss diverges (the diverging point is kept in the
  record so the plot shows the blow-up). Returns {lrs, losses, smoothed,
  diverged, suggested_min_lr, suggested_max_lr, min_loss_lr, steepest_lr}.
  """
  lrs = np.asarray(lrs, float)
  losses, smoothed, best, m, stopped, start = [], [], np.inf, 0.0, False, None
  for i, lr in enumerate(lrs):
    loss = float(step(i, float(lr)))
    m = beta * m + (1 - beta) * loss
    s = m / (1 - beta ** (i + 1))
    losses.append(loss)
    smoothed.append(s)
    if log and (i % 20 == 0 or i == len(lrs) - 1):
      log(f"step {i}: lr {lr:.2e} loss {loss:.4f} smoothed {s:.4f}")
    start = s if i == skip_start else start
    if not np.isfinite(s) or (i >= skip_start and diverged(s, best, factor, start)):
      stopped = True
      if log:
        log(f"stopped at step {i} (lr {lr:.2e}): smoothed loss {s:.4f} diverged (best {best:.4f}, "
            f"start {start if start is not None else float('nan'):.4f}, factor {factor})")
      break
    if i >= skip_start:
      best = min(best, s)
  n = len(losses)
  # The divergent last point never is the minimum; leave it out of the suggestion (unless it is
  # all there is: the loss blew up at the first step).
  usable = n - stopped if n - stopped > 0 else n
  if usable < 3 + skip_start:
    logging.warning("LR range test stopped after %d step(s)%s; returning what it has", n,
                    " (the loss diverged)" if stopped else "")
  suggestion = suggest_range(lrs[:usable], smoothed[:usable], skip_start)
  return dict(lrs=lrs[:n].tolist(), losses=losses, smoothed=smoothed, diverged=stopped, **suggestion)


def plot(result: dict, path, title: str = "LR range test") -> str:
  """Loss (raw and smoothed) against log LR with the suggested range shaded, as a PNG at `path`
  (local or gs://); returns the path written."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2))
  ax.plot(result["lrs"], result["losses"], color="0.75", lw=0.8, label="loss (per step)")
  ax.plot(result["lrs"], result["smoothed"], color="C0", lw=2, label="smoothed loss")
  ax.axvspan(result["suggested_min_lr"], result["suggested_max_lr"], color="C2", alpha=0.25,
             label=f"suggested range [{result['suggested_min_lr']:.1e}, {result['suggested_max_lr']:.1e}]")
  ax.axvline(result["min_loss_lr"], color="C3", ls="--", lw=1, label=f"min loss at {result['min_loss_lr']:.1e}")
  ax.axvline(result["steepest_lr"], color="C1", ls=":", lw=1, label=f"steepest descent at {result['steepest_lr']:.1e}")
  ax.set_xscale("log")
  finite = [s for s in result["smoothed"] if np.isfinite(s)]
  if finite:  # keep the diverging tail from squashing the interesting part
    lo, hi = min(finite), result["smoothed"][0]
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), max(hi, lo) + 0.6 * (hi - lo + 1e-9))
  ax.set_xlabel("learning rate (log scale)")
  ax.set_ylabel("training loss")
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  from spanlm.paths import write_figure
  return write_figure(fig, path, dpi=120)  # local or gs://


def schedule_overrides(result: dict, schedule: str = "triangular") -> list[str]:
  """--config overrides that run a cyclical schedule over the suggested range."""
  return [f"--config.schedule.name={schedule}",
          f"--config.schedule.min_learning_rate={result['suggested_min_lr']:.3g}",
          f"--config.optimizer.learning_rate={result['suggested_max_lr']:.3g}",
          "--config.schedule.warmup_steps=0"]
