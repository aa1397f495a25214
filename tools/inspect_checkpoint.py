"""What a workdir's checkpoint holds, without building the model.

  python tools/inspect_checkpoint.py --workdir=DIR [--step=N]

Prints JSON: the available (committed) steps, the chosen step (default: the
newest), the parameter count, the SHA-256 of the parameters (leaves in sorted
path order, raw bytes: `resilience.tree_digest`, equal for equal parameters
whatever the mesh they were trained on), whether the stored state digest
matches, the data-iterator state and the run's config (workdir/config.json).
Orbax restores the arrays from its own metadata, so no model code runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def inspect(workdir: str, step: int | None = None) -> dict:
  from spanlm import checkpoint, resilience
  from spanlm.workdir import Workdir
  wd = Workdir(workdir)  # local or gs://
  steps = []
  if wd.has_checkpoints():
    c = wd.checkpointer(async_save=False)
    steps = c.all_steps()
    c.close()
  if not steps:
    raise ValueError(f"no checkpoints in {wd.checkpoints_dir}; is --workdir the directory given to spanlm.main?")
  chosen = steps[-1] if step is None else step
  if chosen not in steps:
    raise ValueError(f"no checkpoint of step {chosen} in {wd.checkpoints_dir}; available: {steps}")
  state, data = checkpoint.read_raw(wd.checkpoints_dir / str(chosen))
  stored = data.pop(checkpoint.DIGEST_KEY, None)
  params_stored = data.pop(checkpoint.PARAMS_DIGEST_KEY, None)
  params_checksum = resilience.state_checksum(state["params"])
  out = {
      "workdir": str(wd.root), "steps": steps, "step": chosen,
      "state_step": int(np.asarray(state["step"])) if "step" in state else None,
      "num_params": int(sum(np.size(x) for x in _leaves(state["params"]))),
      "params_sha256": resilience.tree_digest(state["params"]),
      # Checksums stored at save time (resilience.state_checksum, computed on device).
      "state_checksum_stored": stored,
      "params_checksum_ok": None if params_stored is None else params_stored == params_checksum,
      "data": data,
  }
  config = wd.read_config()
  if config is not None:
    out["config"] = config.to_dict()
  return out


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the --workdir of a spanlm.main run")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  parser.add_argument("--no_config", action="store_true", help="leave the config out of the JSON")
  args = parser.parse_args(argv)
  try:
    out = inspect(args.workdir, args.step)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.no_config:
    out.pop("config", None)
  print(json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
