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
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []
  if not steps:
    raise ValueError(f"no checkpoints in {directory}; is --workdir the directory given to spanlm.main?")
  chosen = steps[-1] if step is None else step
  if chosen not in steps:
    raise ValueError(f"no checkpoint of step {chosen} in {directory}; available: {steps}")
  state, data = checkpoint.read_raw(os.path.join(directory, str(chosen)))
  stored = data.pop(checkpoint.DIGEST_KEY, None)
  out = {
      "workdir": os.path.abspath(workdir), "steps": steps, "step": chosen,
      "state_step": int(np.asarray(state["step"])) if "step" in state else None,
      "num_params": int(sum(np.size(x) for x in _leaves(state["params"]))),
      "params_sha256": resilience.tree_digest(state["params"]),
      # Only a structured restore (as the trainer does) reproduces the saved tree's exact leaf set.
      "state_sha256_stored": stored,
      "data": data,
  }
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      out["config"] = json.load(f)
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
