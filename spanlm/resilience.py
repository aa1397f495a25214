"""Keeping a run alive: preemption, non-finite steps, loss spikes, state digests.

Reusable by any training loop (pretraining in `train.py`, fine-tuning in
`finetune.py`). See docs/robustness.md for the guarantees these give together
with `checkpoint.py`.

Preemption. Cloud TPU maintenance and spot VMs send SIGTERM, then SIGKILL after
a grace period (30 s on GCE spot). The loop finishes the step in flight, writes
a checkpoint and exits 0. Multi-host runs must all stop at the *same* step, or
their checkpoint shards disagree: JAX's preemption sync service (active when
`jax.distributed` is initialized) hears the SIGTERM on any host and agrees on
s* = max_h(step_h) + 1; `reached_preemption_sync_point(s)` is true on every host
at s = s*. A single process has nothing to agree with, so a Python signal
handler sets a flag that is checked after each step.

Non-finite guard. A step is *applied* only if its loss and gradient norm are
finite:  theta_{t+1} = ok ? theta_t + u_t : theta_t, and the same for the
optimizer state (selected inside the jitted step with jnp.where, so it costs no
host round trip). The step counter still advances: the batch was consumed, the
data iterator and `step` stay in lockstep, and the RNG of step t is
fold_in(rng, t), so a resumed run replays the same skips. K consecutive skips
stop the run (`NonFiniteError`): something is broken, and the checkpoints
written so far hold the last good parameters.

Loss spikes. A loss l_t with l_t > mean(W) + k * std(W) over the last |W| finite
losses is logged as a warning and counted (it is not skipped: spikes are often
recoverable, and skipping would hide them).
"""

from __future__ import annotations

import collections
import hashlib
import math
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging


# --- digests ---------------------------------------------------------------------------------
def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def tree_digest(tree) -> str:
  """SHA-256 over the raw bytes of the leaves, in sorted path order ('a/b/kernel').

  Paths are the leaf's key names joined by '/', so a dict of arrays and the
  same dict restored by Orbax without an abstract tree give the same digest.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  named = sorted(("/".join(_key_name(k) for k in path), leaf) for path, leaf in leaves)
  h = hashlib.sha256()
  for _, leaf in named:
    h.update(np.ascontiguousarray(np.asarray(jax.device_get(leaf))).tobytes())
  return h.hexdigest()


def fully_addressable(tree) -> bool:
  """True when this process holds every element of every leaf (single host)."""
  return all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree))


# --- preemption ------------------------------------------------------------------------------
class PreemptionGuard:
  """Answers "should this step be the last one?" after every step.

    with PreemptionGuard() as guard:
      for step in ...:
        state = train_step(state, batch)
        if guard.reached(step):
          save(step, state); break

  Multi-process (jax.distributed initialized): JAX's preemption sync point,
  whose SIGTERM handler is installed by jax.distributed. Single process: our
  own SIGTERM handler sets a flag (the previous handler is restored on exit).
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = signals
    self._flag = threading.Event()
    self._previous = {}
    self.signal_name: str | None = None

  def _distributed(self) -> bool:
    from jax._src import distributed
    return distributed.global_state.client is not None

  def __enter__(self):
    if not self._distributed() and threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    self._flag.set()  # the loop reacts after the step in flight: a handler must not do work

  def reached(self, step: int) -> bool:
    if self._distributed():
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # preemption service disabled (jax_enable_preemption_service=False)
        return False
    return self._flag.is_set()


# --- non-finite steps and spikes -------------------------------------------------------------
class NonFiniteError(ValueError):
  """Too many consecutive steps had a non-finite loss or gradient (a ValueError, so the CLI
  reports it as a one-line error rather than a traceback)."""


def keep_if(ok, new, old):
  """`new` where the scalar `ok` is true, else `old` (leafwise; inside jit)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def step_is_finite(loss, grad_norm):
  return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


def parse_steps(spec: str) -> tuple[int, ...]:
  """'3,7' -> (3, 7); '' -> ()."""
  try:
    return tuple(int(s) for s in str(spec).replace(" ", "").split(",") if s)
  except ValueError:
    raise ValueError(f"invalid config: {spec!r} is not a comma-separated list of step numbers") from None


def poison_at(grads, step, steps: tuple[int, ...]):
  """Testing hook: NaN gradients at the listed step numbers (1-based, as logged; `step` is the
  count of steps taken before this one), else unchanged."""
  if not steps:
    return grads
  hit = jnp.isin(step + 1, jnp.asarray(steps, jnp.int32))
  return jax.tree.map(lambda g: jnp.where(hit, jnp.nan, g), grads)


class StepMonitor:
  """Host-side accounting of skipped (non-finite) steps and loss spikes.

  `observe(step, loss, skipped)` raises NonFiniteError after `max_consecutive`
  skips in a row (0 = never stop).
  """

  def __init__(self, max_consecutive: int = 10, spike_window: int = 100, spike_k: float = 6.0):
    self.max_consecutive = max_consecutive
    self.spike_k = spike_k
    self._window = collections.deque(maxlen=max(spike_window, 0) or None)
    self._spike_window = spike_window
    self.consecutive = 0
    self.skipped = 0
    self.spikes = 0

  def observe(self, step: int, loss: float, skipped: bool) -> None:
    if skipped:
      self.consecutive += 1
      self.skipped += 1
      logging.warning("step %d: non-finite loss/gradient (loss=%s); update skipped "
                      "(%d in a row, %d in this run)", step, loss, self.consecutive, self.skipped)
      if self.max_consecutive and self.consecutive >= self.max_consecutive:
        raise NonFiniteError(
            f"{self.consecutive} consecutive steps (up to step {step}) had a non-finite loss or "
            f"gradient norm, so training stopped; the checkpoints already written hold the last "
            f"good parameters. Lower config.optimizer.learning_rate, raise warmup, check the data, "
            f"or raise config.train.max_nonfinite_steps.")
      return
    self.consecutive = 0
    if self._spike_window and len(self._window) >= min(self._spike_window, 10):
      mean, std = float(np.mean(self._window)), float(np.std(self._window))
      if loss > mean + self.spike_k * max(std, 1e-6):
        self.spikes += 1
        logging.warning("step %d: loss spike %.4f > mean %.4f + %g * std %.4f over the last %d "
                        "steps (%d spikes in this run)", step, loss, mean, self.spike_k, std,
                        len(self._window), self.spikes)
    if math.isfinite(loss):
      self._window.append(loss)

  def metrics(self) -> dict[str, Any]:
    return {"nonfinite_steps": float(self.skipped), "loss_spikes": float(self.spikes)}
