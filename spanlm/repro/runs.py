"""Training a claim's pretraining runs: side by side on a multi-core CPU, never past a preemption.

A tiny model's train step on CPU keeps about one core busy (measured: the mapnet claim's runs at
87% CPU on 2 cores, 1.8 steps/s), so on this 2-core machine two runs in two processes take about
the wall time of one. `train_runs` does that on the CPU backend (`workers=0`: one process per core,
at most one per run) and trains one run at a time in this process elsewhere (one accelerator is not
shared between processes). The processes are spawned (JAX is not fork-safe); each run's log lines
carry its workdir's name.

A run stopped by a preemption signal (SIGTERM/SIGINT: it checkpoints and returns early) is not a
result: `Preempted` is raised and the claim stops; rerunning the same command resumes every run from
its checkpoint (finished runs return at once).
"""

from __future__ import annotations

import concurrent.futures
import logging as std_logging
import multiprocessing
import os
import signal


class Preempted(RuntimeError):
  """A run of the claim stopped early on a preemption signal (its checkpoint is written)."""


class _Prefix(std_logging.Filter):
  def __init__(self, name: str):
    super().__init__()
    self.name_ = name

  def filter(self, record):
    record.msg = f"[{self.name_}] {record.msg}"
    return True


def _train(config, workdir: str, prefix: bool) -> dict:
  from absl import logging

  from spanlm import train
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()
  if prefix:  # a spawned worker: absl's handler, as under app.run, and the run's name on each line
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # no "Logging before flag parsing" line: the parent parsed them
    root = std_logging.getLogger()
    for h in list(root.handlers):
      root.removeHandler(h)
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    handler = logging.get_absl_handler()
    for f in [f for f in handler.filters if isinstance(f, _Prefix)]:  # a worker trains several runs
      handler.removeFilter(f)
    handler.addFilter(_Prefix(os.path.basename(os.path.normpath(workdir))))
  return train.train_and_evaluate(config, workdir)


def run_dir(out: str, arm: str, seed: int) -> str:
  """The workdir of one (arm, seed) run of a claim writing to `out`."""
  return os.path.join(out, "runs", f"{arm.replace('+', '_')}_seed{seed}")


def default_workers(n_runs: int) -> int:
  """One process per CPU core on the CPU backend (at most `n_runs`); 1 on an accelerator."""
  import jax
  if jax.default_backend() != "cpu":
    return 1
  return max(1, min(n_runs, os.cpu_count() or 1))


def train_runs(runs: list[tuple[object, str]], workers: int = 0, log=print) -> list[dict]:
  """Train every (config, workdir) of `runs`, `workers` at a time (0: `default_workers`); returns
  each run's result in order. Raises `Preempted` if any run stopped on a preemption signal."""
  workers = workers or default_workers(len(runs))
  if workers <= 1:
    results = []
    for config, workdir in runs:
      results.append(_train(config, workdir, prefix=False))
      _check(results[-1], workdir)
    return results
  log(f"training {len(runs)} runs, {workers} at a time in separate processes (CPU backend, "
      f"{os.cpu_count()} cores; --workers=1 for one at a time)")
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    futures = [pool.submit(_train, config, workdir, True) for config, workdir in runs]
    forward = _forward_signals(pool)
    try:
      results = [f.result() for f in futures]
    finally:
      forward()
  for result, (_, workdir) in zip(results, runs):
    _check(result, workdir)
  return results


def _check(result: dict, workdir: str) -> None:
  if result.get("preempted"):
    raise Preempted(f"the run in {workdir} stopped at step {result.get('step')} on a preemption signal "
                    f"(checkpoint written); rerun the same command to resume every run")


def _forward_signals(pool) -> callable:
  """Pass SIGTERM/SIGINT on to the worker processes (each checkpoints and returns "preempted")
  instead of killing this process first; returns the function that puts the old handlers back."""
  def handler(signum, frame):
    for p in list(getattr(pool, "_processes", {}).values()):
      try:
        os.kill(p.pid, signum)
      except ProcessLookupError:
        pass
  old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  return lambda: [signal.signal(s, h) for s, h in old.items()]
