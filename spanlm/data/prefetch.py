"""Batches staged on device ahead of the step that needs them (input that never stalls).

`DevicePrefetcher` runs a background thread that pulls the host iterator (grain, with its own
worker processes: `config.data.num_workers`) and builds the global on-device batch (the caller's
`to_device`, e.g. `parallel.global_batch`), keeping up to `depth` batches ready
(`config.data.prefetch`), so the copy of batch n+1 overlaps step n. `take_wait_fraction` is the
time blocked in next() over the time between successive next() returns (one training step each;
intervals holding an evaluation or a checkpoint are left out with `exclude_interval`): the
training loop logs it as `perf/input_wait_fraction`.

Checkpoints stay exact: each staged batch carries the host iterator's state taken right after
it was read, and `get_state()` returns the state of the last batch handed out, not of the
batches read ahead.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator

_DONE = object()


class DevicePrefetcher:
  """Iterator over `to_device(next(host_iter))`, computed `depth` batches ahead in a thread."""

  def __init__(self, host_iter: Iterator, to_device: Callable[[Any], Any], depth: int = 2):
    if depth < 1:
      raise ValueError(f"config.data.prefetch={depth}: stage at least 1 batch ahead")
    self._host, self._to_device, self._depth = host_iter, to_device, depth
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._state = host_iter.get_state() if hasattr(host_iter, "get_state") else None
    self._wait, self._steps = 0.0, 0.0  # seconds blocked / seconds between next() returns
    self._last: float | None = None  # when next() last returned (None: don't count the interval)

  def _run(self):
    try:
      for local in self._host:
        state = self._host.get_state() if hasattr(self._host, "get_state") else None
        item = (state, self._to_device(local))
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
      self._queue.put((None, _DONE))
    except BaseException as e:  # surfaces in the consumer's next(), with its traceback
      self._queue.put((None, e))

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is None:  # started on first use: set_state on the host iterator comes first
      self._thread = threading.Thread(target=self._run, name="spanlm-prefetch", daemon=True)
      self._thread.start()
    t0 = time.perf_counter()
    state, item = self._queue.get()
    now = time.perf_counter()
    if self._last is not None:
      self._wait += now - t0
      self._steps += now - self._last
    self._last = now
    if item is _DONE:
      self._queue.put((None, _DONE))
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    self._state = state
    return item

  def exclude_interval(self):
    """Leave the time until the next next() out of the fraction (evaluation, checkpointing)."""
    self._last = None

  def take_wait_fraction(self) -> float:
    """Seconds blocked in next() / seconds between next() returns, since the last call (then reset)."""
    fraction = self._wait / self._steps if self._steps > 0 else 0.0
    self._wait = self._steps = 0.0
    return fraction

  def get_state(self):
    """The host iterator's state just after the last batch handed out (for checkpoints)."""
    return self._state

  def close(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)


class Reiterable:
  """An iterable that calls `make()` afresh on every pass: eval batches read lazily, per pass."""

  def __init__(self, make: Callable[[], Iterable]):
    self._make = make

  def __iter__(self):
    return iter(self._make())
