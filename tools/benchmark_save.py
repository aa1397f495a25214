"""How long a checkpoint save stalls the training loop, with the old and the new state digest.

  python tools/benchmark_save.py [--size=base] [--repeats=3] [--workdir=/tmp/save_bench]

Builds the full TrainState (parameters + AdamW moments) of a BERT model of `--size` on this
machine's devices and times, after a warm-up:
  - `host_sha256_s`: the SHA-256 of every leaf's bytes on the host (`resilience.tree_digest`,
    what each save computed before), which the loop waited for;
  - `device_checksum_s`: `resilience.state_checksum`, the on-device checksum saves store now;
  - `save_call_s`: the whole `Checkpointer.save` call as the loop sees it (async write, checksum
    included), and `save_total_s` until the write has finished; `*_host_sha256_s` the same with
    the host SHA-256 in place of the checksum (the save as it was).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="base")
  parser.add_argument("--vocab_size", type=int, default=30522)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workdir", default="/tmp/spanlm_save_bench")
  args = parser.parse_args(argv)

  import jax
  import numpy as np

  import spanlm
  from spanlm import checkpoint, parallel, resilience

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = spanlm.load_config(os.path.join(root, "experiments", "bert.py"))
  c.model.size = args.size
  c.mesh.data, c.mesh.fsdp, c.mesh.model = 1, 1, 1
  trainer = spanlm.Trainer(c, args.vocab_size, np.ones(args.vocab_size, bool),
                           parallel.make_mesh(c.mesh, jax.devices()[:1]))
  state = jax.block_until_ready(trainer.init_state())
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))

  def timed(fn):
    fn()  # warm-up (compiles the checksum once)
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  out = {"model": args.size, "state_bytes": nbytes, "device": jax.devices()[0].device_kind,
         "host_sha256_s": timed(lambda: resilience.tree_digest(state)),
         "device_checksum_s": timed(lambda: resilience.state_checksums(state, ("", "params/")))}
  def saves():
    shutil.rmtree(args.workdir, ignore_errors=True)
    ckpt = checkpoint.Checkpointer(args.workdir, max_to_keep=1)
    calls, totals = [], []
    for step in range(1, args.repeats + 2):
      start = time.perf_counter()
      ckpt.save(step, state, {"iterator": {"next_index": step}})
      call = time.perf_counter() - start
      ckpt.wait()
      if step > 1:  # the first save also creates the directories
        calls.append(call)
        totals.append(time.perf_counter() - start)
    ckpt.close()
    shutil.rmtree(args.workdir, ignore_errors=True)
    return statistics.median(calls), statistics.median(totals)

  out["save_call_s"], out["save_total_s"] = saves()
  new = resilience.state_checksums
  # The save as it was: one SHA-256 of the whole state on the host.
  resilience.state_checksums = lambda tree, prefixes=("",): (resilience.tree_digest(tree), None)
  try:
    out["save_call_host_sha256_s"], out["save_total_host_sha256_s"] = saves()
  finally:
    resilience.state_checksums = new
  print(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
