"""The device prefetcher: order, exact iterator state for checkpoints, errors, overlap."""

import time

import pytest

from spanlm.data.prefetch import DevicePrefetcher, Reiterable


class Counter:
  """A host iterator with grain's get_state/set_state: yields 0, 1, 2, ... after `delay` s each."""

  def __init__(self, n=None, delay=0.0, fail_at=None):
    self.pos, self.n, self.delay, self.fail_at = 0, n, delay, fail_at

  def __iter__(self):
    return self

  def __next__(self):
    if self.n is not None and self.pos >= self.n:
      raise StopIteration
    if self.pos == self.fail_at:
      raise OSError("disk gone")
    time.sleep(self.delay)
    self.pos += 1
    return self.pos - 1

  def get_state(self):
    return {"pos": self.pos}


def test_batches_in_order_and_state_of_the_last_one_handed_out():
  host = Counter(n=20)
  it = DevicePrefetcher(host, lambda x: x * 10, depth=3)
  assert it.get_state() == {"pos": 0}
  got = []
  for _ in range(5):
    got.append(next(it))
    time.sleep(0.1)  # the thread reads ahead meanwhile: up to depth staged + one in hand
  assert got == [0, 10, 20, 30, 40]
  assert host.pos > 5  # read ahead of the consumer ...
  assert it.get_state() == {"pos": 5}  # ... but a checkpoint resumes after batch 5, not later
  assert list(it) == [x * 10 for x in range(5, 20)]
  it.close()


def test_errors_in_the_reader_surface_in_next():
  it = DevicePrefetcher(Counter(fail_at=2), lambda x: x, depth=2)
  assert next(it) == 0 and next(it) == 1
  with pytest.raises(OSError, match="disk gone"):
    next(it)
  it.close()


def test_reading_overlaps_the_step_and_the_wait_fraction_says_so():
  # Reading takes 40 ms, a step 60 ms: staged ahead, the loop (almost) never waits after the first
  # batch; read in turn instead of ahead, it would wait 40 of every 100 ms (fraction 0.4).
  it = DevicePrefetcher(Counter(delay=0.04), lambda x: x, depth=2)
  next(it)
  for _ in range(10):
    time.sleep(0.06)  # the "step"
    next(it)
  assert it.take_wait_fraction() < 0.2
  it.close()
  # Reading slower than the step: the loop waits ~ (80 - 20) / 80 of the time.
  it = DevicePrefetcher(Counter(delay=0.08), lambda x: x, depth=2)
  next(it)
  for _ in range(8):
    time.sleep(0.02)
    next(it)
  assert 0.5 < it.take_wait_fraction() <= 1.0
  it.close()


def test_excluded_intervals_do_not_count():
  """A loop that only waits (reading 50 ms, no compute) has fraction ~1, also when an
  excluded interval (an evaluation of 300 ms) lies in between; counted, it would be ~0.3."""
  it = DevicePrefetcher(Counter(delay=0.05), lambda x: x, depth=1)
  next(it)
  for _ in range(3):
    next(it)
  it.exclude_interval()
  time.sleep(0.3)
  for _ in range(3):
    next(it)
  assert it.take_wait_fraction() > 0.8
  it.close()


def test_reiterable_reads_again_on_every_pass():
  calls = []
  r = Reiterable(lambda: (calls.append(1), iter([1, 2]))[1])
  assert calls == []  # nothing read at construction
  assert list(r) == [1, 2] and list(r) == [1, 2] and len(calls) == 2
