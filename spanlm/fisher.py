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

  from spanlm import checkpoint as ckpt_lib
  from spanlm import parallel
  from spanlm.data import pipeline, prepare
  from spanlm.data.tokenizer import Tokenizer
  from spanlm.train import Trainer

  workdir = os.path.abspath(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"workdir {workdir!r} holds no checkpoints/; train task A there first "
                            "(python -m spanlm.main --config=... --workdir=...)")
  t = config.train
  data_dir = prepare.ensure_prepared(config.data.corpus, workdir, t.seq_len, tokenizer=config.data.tokenizer,
                                     vocab_size=config.data.vocab_size,
                                     validation_fraction=config.data.validation_fraction)
  dataset = prepare.load_prepared(data_dir)
  tokenizer = Tokenizer.load(dataset.tokenizer_path)
  trainer = Trainer(config, tokenizer.vocab_size, tokenizer.word_start_table(), parallel.make_mesh(config.mesh))
  checkpointer = ckpt_lib.Checkpointer(workdir)
  step = checkpointer.latest_step()
  state, _ = checkpointer.restore(step, trainer.abstract_state)
  checkpointer.close()
  batches = pipeline.eval_batches(dataset.train, batch_size=chunk, max_batches=-(-num_examples // chunk))
  start = time.time()
  fisher, n = trainer_fisher(trainer, state.params, batches, seed=config.seed)
  seconds = time.time() - start
  out = out or os.path.join(workdir, "ewc", "fisher.npz")
  save(out, fisher, state.params)
  leaves = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(fisher))])
  summary = {"checkpoint_step": int(step), "num_examples": n, "num_params": int(leaves.size),
             "fisher_mean": float(leaves.mean()), "fisher_max": float(leaves.max()),
             "fisher_median": float(np.median(leaves)), "seconds": seconds, "file": out}
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(summary, f, indent=1)
  return summary
