"""The EWC Fisher of a pretraining workdir: a procedure that drives a Trainer.

It lives outside `spanlm.optim` (which holds the math: `optim/ewc.py`) because it
builds a `spanlm.train.Trainer`, and train imports optim/ewc for the penalty.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from spanlm.optim.ewc import save, trainer_fisher


def compute_for_workdir(config, workdir: str, num_examples: int = 1024, chunk: int = 16,
                        out: str | None = None) -> dict:
  """Fisher of the latest checkpoint in `workdir` (task A) over its first training rows.

  Writes `out` (default WORKDIR/ewc/fisher.npz) and a .json summary beside it;
  returns the summary. `config` must be task A's (same model and data).
  """
  import json
  import time

  from spanlm import parallel
  from spanlm import workdir as workdir_lib
  from spanlm.data import pipeline
  from spanlm.train import Trainer

  wd = workdir_lib.Workdir(workdir)
  if not wd.has_checkpoints():
    raise FileNotFoundError(f"workdir {wd} holds no checkpoints/; train task A there first "
                            "(python -m spanlm.main --config=... --workdir=...)")
  wd.check_config(config)  # task A's config: same model and data
  dataset, tokenizer = wd.prepare_data(config)  # the config's own packing and vocabulary
  trainer = Trainer(config, tokenizer.vocab_size, tokenizer.word_start_table(), parallel.make_mesh(config.mesh))
  step, state, _ = wd.latest(trainer.abstract_state)  # newest intact checkpoint (digest, fallback)
  batches = pipeline.eval_batches(dataset.train, batch_size=chunk, max_batches=-(-num_examples // chunk))
  start = time.time()
  fisher, n = trainer_fisher(trainer, state.params, batches, seed=config.seed)
  seconds = time.time() - start
  out = str(out or (wd.root / "ewc" / "fisher.npz"))
  save(out, fisher, state.params)
  leaves = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(fisher))])
  summary = {"checkpoint_step": int(step), "num_examples": n, "num_params": int(leaves.size),
             "fisher_mean": float(leaves.mean()), "fisher_max": float(leaves.max()),
             "fisher_median": float(np.median(leaves)), "seconds": seconds, "file": out}
  workdir_lib.path(os.path.splitext(out)[0] + ".json").write_text(json.dumps(summary, indent=1))
  return summary
