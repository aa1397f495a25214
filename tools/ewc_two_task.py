r"""EWC's two-task forgetting measurement: masked LM on two disjoint book sets, A then B.

  python tools/ewc_two_task.py --out=/tmp/ewc --steps=200 --lambdas=0,1000,100000

Task A = MLM on the bundled sample's books pg1* (Alice, The Prince, Pride and
Prejudice, Sherlock Holmes), task B = the other six; both use the sample's
tokenizer. The phases go through the real CLI paths:
spanlm.train.train_and_evaluate on A (WORKDIR out/task_a), the Fisher with
spanlm.fisher.compute_for_workdir (= tools/compute_fisher.py), then for each
lambda a run on B that starts from theta*_A (config.ewc.init_from_theta, fresh
optimizer state) with config.ewc.lambda_ = lambda (0 = plain fine-tuning on B).
Reports task A's and task B's held-out MLM loss after A and after each B run,
as JSON and Markdown in --out.
"""

import glob
import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from spanlm import fisher as fisher_lib
from spanlm import parallel, paths, train
from spanlm import workdir as workdir_lib
from spanlm.data import pipeline, sample

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "bert.py") + ":tiny"
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Experiment file[:preset] of both tasks.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", "ewc_two_task", "Output directory (workdirs of every phase).")
_STEPS = flags.DEFINE_integer("steps", 200, "Optimizer steps on task A.")
_STEPS_B = flags.DEFINE_integer("steps_b", 0, "Optimizer steps on task B (0 = --steps).")
_LAMBDAS = flags.DEFINE_list("lambdas", ["0", "1000", "100000"], "EWC lambda of each task-B run (0 = none).")
_FISHER_EXAMPLES = flags.DEFINE_integer("fisher_examples", 512, "Task-A rows the Fisher averages over.")


def _corpora():
  """Globs of the two disjoint halves of the bundled sample (checked to partition it)."""
  files = sorted(sample.corpus_files())
  folder = os.path.dirname(files[0])
  a, b = os.path.join(folder, "pg1*.txt.gz"), os.path.join(folder, "pg[2-9]*.txt.gz")
  if sorted(glob.glob(a) + glob.glob(b)) != files or not glob.glob(a) or not glob.glob(b):
    raise ValueError(f"the bundled sample in {folder} no longer splits into {a} and {b}; update _corpora")
  return a, b


def heldout_loss(config, workdir, corpus, data_workdir):
  """Held-out MLM loss of `workdir`'s latest checkpoint on `corpus`'s validation split."""
  t = config.train
  eval_config = config.copy_and_resolve_references()
  eval_config.data.corpus = corpus
  # The config's own packing and vocabulary, prepared under data_workdir; restore via the Checkpointer.
  dataset, tokenizer = workdir_lib.Workdir(data_workdir).prepare_data(eval_config)
  trainer = train.Trainer(config, tokenizer.vocab_size, tokenizer.word_start_table(),
                          parallel.make_mesh(config.mesh))
  _, state, _ = workdir_lib.Workdir(workdir).latest(trainer.abstract_state)
  batches = pipeline.eval_batches(dataset.validation, batch_size=t.batch_size)
  return trainer.evaluate(state.params, batches)["eval/mlm_loss"], len(dataset.validation)


def main(argv):
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # JAX, TFDS and Orbax INFO lines only at --verbosity=1
  del argv
  paths.check_bucket_or_exit(_OUT.value)  # a bad URL or gs:// bucket: one line, before any training
  out = str(paths.path(_OUT.value))  # local (made absolute) or gs://
  corpus_a, corpus_b = _corpora()
  base = _CONFIG.value.copy_and_resolve_references()
  base.data.tokenizer = sample.tokenizer_path()  # one vocabulary for both tasks
  base.data.validation_fraction = 0.05
  base.train.num_steps = base.train.eval_every = base.train.checkpoint_every = _STEPS.value
  base.train.log_every = max(_STEPS.value // 4, 1)
  base.schedule.warmup_steps = min(base.schedule.warmup_steps, _STEPS.value // 4)

  cfg_a = base.copy_and_resolve_references()
  cfg_a.data.corpus = corpus_a
  dir_a = os.path.join(out, "task_a")
  train.train_and_evaluate(cfg_a, dir_a)
  fisher = fisher_lib.compute_for_workdir(cfg_a, dir_a, _FISHER_EXAMPLES.value)
  print(f"Fisher: {fisher['num_examples']} examples, mean {fisher['fisher_mean']:.3e}, "
        f"max {fisher['fisher_max']:.3e}", flush=True)
  a_after_a, n_a = heldout_loss(base, dir_a, corpus_a, dir_a)
  b_after_a, n_b = heldout_loss(base, dir_a, corpus_b, dir_a)
  rows = [{"phase": "after A", "lambda": None, "task_a_loss": a_after_a, "task_b_loss": b_after_a}]
  for lam in map(float, _LAMBDAS.value):
    cfg_b = base.copy_and_resolve_references()
    cfg_b.data.corpus = corpus_b
    if _STEPS_B.value:
      cfg_b.train.num_steps = cfg_b.train.eval_every = cfg_b.train.checkpoint_every = _STEPS_B.value
    cfg_b.ewc.fisher_path, cfg_b.ewc.lambda_, cfg_b.ewc.init_from_theta = fisher["file"], lam, True
    dir_b = os.path.join(out, f"task_b_lambda{lam:g}")
    result = train.train_and_evaluate(cfg_b, dir_b)
    rows.append({"phase": "after B", "lambda": lam, "task_a_loss": heldout_loss(base, dir_b, corpus_a, dir_a)[0],
                 "task_b_loss": heldout_loss(base, dir_b, corpus_b, dir_a)[0],
                 "final_ewc_penalty": result.get("train/ewc_penalty")})
    print(rows[-1], flush=True)
  md = ["| phase | EWC lambda | task A held-out MLM loss | task B held-out MLM loss |", "|---|---|---|---|"]
  lam_text = lambda r: "-" if r["lambda"] is None else f"{r['lambda']:g}"
  md += [f"| {r['phase']} | {lam_text(r)} | {r['task_a_loss']:.3f} | {r['task_b_loss']:.3f} |" for r in rows]
  summary = {"task_a": corpus_a, "task_b": corpus_b, "steps": [_STEPS.value, _STEPS_B.value or _STEPS.value], "heldout_rows": [n_a, n_b],
             "model": base.model.size, "batch": [base.train.batch_size, base.train.seq_len],
             "fisher": fisher, "rows": rows, "device": jax.devices()[0].device_kind}
  paths.write_text_atomic(os.path.join(out, "ewc_two_task.json"), json.dumps(summary, indent=1))
  paths.write_text_atomic(os.path.join(out, "ewc_two_task.md"), "\n".join(md) + "\n")
  print("\n".join(md))


if __name__ == "__main__":
  app.run(main)
