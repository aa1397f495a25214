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
import os
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


def _as_uint32(x):
  """The bits of `x` as uint32 words (narrower types widened, 64-bit ones split in two)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  raise ValueError(f"cannot checksum dtype {x.dtype}")


def _position_weights(shape):
  """An odd uint32 weight per element, from its flat index (computed where the shard lives)."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index * jnp.uint32(2) + jnp.uint32(1)


@jax.jit
def _leaf_checksums(leaves):
  out = []
  for x in leaves:
    u = _as_uint32(x)
    w = _position_weights(u.shape)
    # Odd weights: flipping any one bit of any element changes the sum (mod 2^32).
    out.append(jnp.sum(u * w, dtype=jnp.uint32))
  return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


def state_checksums(tree, prefixes: tuple[str, ...] = ("",)) -> tuple[str, ...]:
  """`state_checksum` of the subtrees whose paths start with each prefix, in one device pass."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  named = sorted(("/".join(_key_name(k) for k in path), leaf) for path, leaf in leaves)
  sums = np.asarray(jax.device_get(_leaf_checksums([leaf for _, leaf in named])))
  out = []
  for prefix in prefixes:
    h = hashlib.sha256()
    for (name, _), value in zip(named, sums):
      if name.startswith(prefix):
        h.update(name[len(prefix):].encode() + np.asarray(value, "<u4").tobytes())
    out.append(h.hexdigest())
  return tuple(out)


def state_checksum(tree) -> str:
  """Checksum of a tree's leaves computed on device, where the arrays live (sharded, any host).

  Per leaf (sorted path order, as `tree_digest`) a position-weighted sum of the
  leaf's 32-bit words mod 2^32 with odd weights: every single-bit flip changes it. This
  replaces a host-side SHA-256 at save time: no array is copied to the host, every
  process computes the same value (the sums are global reductions), and a dict
  restored without an abstract tree gives the same checksum as the saved one.
  """
  return state_checksums(tree)[0]


# --- hosts that agree ----------------------------------------------------------------------
_BARRIERS = collections.Counter()


def barrier(name: str, timeout_s: float = 600.0) -> None:
  """Wait until every process gets here; after `timeout_s` raise naming the ones that did not.

  A no-op in a single process. Each process first records its arrival in the
  coordination service's key-value store, so the error can say who is missing.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed
  client = distributed.global_state.client
  _BARRIERS[name] += 1
  key = f"spanlm_barrier/{name}.{_BARRIERS[name]}"
  client.key_value_set(f"{key}/{jax.process_index()}", "1")
  try:
    client.wait_at_barrier(key, timeout_in_ms=int(timeout_s * 1000))
  except Exception as e:  # the coordination service's timeout (XlaRuntimeError / JaxRuntimeError)
    try:
      arrived = {int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get(f"{key}/")}
    except Exception:  # noqa: BLE001: the service itself may be gone
      arrived = set()
    missing = sorted(set(range(jax.process_count())) - arrived)
    raise RuntimeError(f"processes {missing} of {jax.process_count()} did not reach '{name}' within "
                       f"{timeout_s:.0f} s (crashed, hung or much slower); see their logs") from e


def all_agree(ok: bool) -> bool:
  """True on every process if `ok` is true on every process (one decision shared by all)."""
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(bool(ok)))))


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
  whose SIGTERM handler is installed by jax.distributed; SIGINT is forwarded to
  it as SIGTERM. Single process: our own SIGTERM/SIGINT handler sets a flag (the
  previous handlers are restored on exit). Either way Ctrl-C behaves like a
  preemption: the step in flight finishes, is checkpointed, and the run exits 0.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._signals = signals
    self._flag = threading.Event()
    self._previous = {}
    self.signal_name: str | None = None

  def _distributed(self) -> bool:
    from jax._src import distributed
    return distributed.global_state.client is not None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      distributed = self._distributed()
      for sig in self._signals:
        if distributed and sig == signal.SIGTERM:
          continue  # jax.distributed's own handler feeds the preemption sync point
        self._previous[sig] = signal.signal(sig, self._forward if distributed else self._handle)
    return self

  def _forward(self, signum, frame):
    """Multi-process: SIGINT (Ctrl-C) becomes the SIGTERM that JAX's preemption notifier hears."""
    del frame
    self.signal_name = signal.Signals(signum).name
    os.kill(os.getpid(), signal.SIGTERM)

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
