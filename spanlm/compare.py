"""Pretraining objectives compared at equal compute, then fine-tuned on SST-2.

Every objective pretrains the same tiny encoder family (each experiment's `:tiny`
preset, based on `configs.cpu_tiny`) on the same corpus for the same budget
(steps × batch × sequence length tokens), then `experiments/glue.py:sst2` fine-
tunes the resulting encoder (config.init_checkpoint = the pretraining workdir;
for ELECTRA that is the discriminator, for distillation the student). The
pretraining losses are each objective's own (not comparable across objectives);
the held-out MLM loss is comparable where the objective has an MLM head of the
same kind (MAPNet evaluates with uniform masking), SST-2 dev accuracy always.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import ml_collections
from absl import logging

from spanlm import configs, paths

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def _whole_word(c):
  c.masking.scheme = "whole_word"


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str
  spec: str  # experiment file and preset
  edit: Callable[[ml_collections.ConfigDict], None] | None = None


OBJECTIVES = {
    "mlm": Entry("mlm", "bert.py:tiny"),
    "whole_word": Entry("whole_word", "bert.py:tiny", _whole_word),
    "span_sbo": Entry("span_sbo", "span_bert.py:tiny"),
    "albert_sop": Entry("albert_sop", "albert.py:tiny"),
    "electra": Entry("electra", "electra.py:tiny"),
    "mapnet": Entry("mapnet", "mapnet.py:tiny"),
}


def pretrain_config(name: str, steps: int, batch_size: int, seq_len: int, corpus: str = "",
                    seed: int = 0) -> ml_collections.ConfigDict:
  if name not in OBJECTIVES:
    raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
  e = OBJECTIVES[name]
  c = configs.load(os.path.join(EXPERIMENTS, e.spec))
  if e.edit:
    e.edit(c)
  c.seed = seed
  c.data.corpus = corpus
  t = c.train
  t.num_steps, t.batch_size, t.seq_len = steps, batch_size, seq_len
  if batch_size % t.grad_accum_steps:
    t.grad_accum_steps = 1
  t.log_every = max(steps // 20, 1)
  t.eval_every = 0  # held-out evaluation at the end only
  t.checkpoint_every = steps
  t.keep_checkpoints = 1
  c.schedule.warmup_steps = min(c.schedule.warmup_steps, max(steps // 10, 1))
  return c


def finetune_config(pretrain_dir: str, glue_dir: str, steps: int, batch_size: int,
                    learning_rate: float, max_train_examples: int, seed: int = 0):
  c = configs.load(os.path.join(EXPERIMENTS, "glue.py:sst2"))
  c.seed = seed
  c.init_checkpoint = pretrain_dir
  c.task.data_dir = os.path.join(glue_dir, "SST-2")
  c.task.predict_split = ""
  c.task.max_train_examples = max_train_examples
  c.finetune.max_steps = steps
  c.train.batch_size = batch_size
  c.train.log_every = max(steps // 5, 1)
  c.optimizer.learning_rate = learning_rate
  c.model.dropout_rate = 0.1
  return c


def read_metrics(workdir) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (local or gs://); [] if there is none."""
  path = paths.path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(name: str, out_dir: str, glue_dir: str, steps: int, batch_size: int, seq_len: int,
            finetune_steps: int, finetune_batch: int, finetune_lr: float, max_train_examples: int,
            corpus: str = "") -> dict:
  """Pretrain one objective, fine-tune its encoder on SST-2; a row of the table."""
  from spanlm import finetune, train

  pre_dir = str(paths.path(out_dir) / "pretrain" / name)  # out_dir: a local folder or a gs:// URL
  ft_dir = str(paths.path(out_dir) / "sst2" / name)
  row = {"objective": name, "experiment": OBJECTIVES[name].spec, "steps": steps,
         "tokens": steps * batch_size * seq_len}
  t0 = time.time()
  train.train_and_evaluate(pretrain_config(name, steps, batch_size, seq_len, corpus), pre_dir)
  row["pretrain_seconds"] = round(time.time() - t0, 1)
  history = read_metrics(pre_dir)
  losses = [r for r in history if "train/loss" in r]
  evals = [r for r in history if "eval/mlm_loss" in r]
  row["final_pretrain_loss"] = losses[-1]["train/loss"] if losses else None
  row["heldout_mlm_loss"] = evals[-1]["eval/mlm_loss"] if evals else None
  if glue_dir:
    t0 = time.time()
    result = finetune.run(finetune_config(pre_dir, glue_dir, finetune_steps, finetune_batch, finetune_lr,
                                          max_train_examples), ft_dir)
    row["finetune_steps"] = finetune_steps
    row["sst2_dev_accuracy"] = result.get("best/accuracy")
    row["finetune_seconds"] = round(time.time() - t0, 1)
  return row


def markdown(rows: list[dict]) -> str:
  def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)

  lines = ["| objective | experiment | steps | tokens | final pretrain loss | held-out MLM loss | "
           "SST-2 dev acc |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['objective']} | {r.get('experiment', '')} | failed: {r['error']} | | | | |")
      continue
    lines.append(f"| {r['objective']} | {r['experiment']} | {r['steps']} | {r['tokens']:,} | "
                 f"{fmt(r['final_pretrain_loss'], '.3f')} | {fmt(r['heldout_mlm_loss'], '.3f')} | "
                 f"{fmt(r.get('sst2_dev_accuracy'), '.3f')} |")
  return "\n".join(lines) + "\n"


def plot_losses(out_dir: str, names: list[str], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name in names:
    hist = [r for r in read_metrics(paths.path(out_dir) / "pretrain" / name) if "train/loss" in r]
    if hist:
      axes[0].plot([r["step"] for r in hist], [r["train/loss"] for r in hist], label=name)
      mlm = [r for r in hist if "train/mlm_loss" in r]
      axes[1].plot([r["step"] for r in mlm], [r["train/mlm_loss"] for r in mlm], label=name)
  axes[0].set(title="objective's own training loss", xlabel="step", ylabel="loss", yscale="log")
  axes[1].set(title="(generator / importance-weighted) MLM loss", xlabel="step", ylabel="MLM CE")
  for ax in axes:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.write_figure(fig, path, dpi=120)


def compare(names: list[str], out_dir: str, glue_dir: str, **kw) -> list[dict]:
  """Run every objective in `names`; write compare.md, compare.json and loss_curves.png."""
  if glue_dir and not paths.is_file(os.path.join(glue_dir, "SST-2", "dev.tsv")):  # local or gs://
    raise FileNotFoundError(f"{glue_dir}/SST-2/dev.tsv not found: --glue_dir must hold GLUE's "
                            "SST-2/{train,dev}.tsv")
  paths.check_bucket(out_dir)
  out = paths.path(out_dir)  # a local folder or a gs:// URL
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for name in names:
    logging.info("=== %s ===", name)
    try:
      rows.append(run_one(name, out_dir, glue_dir, **kw))
    except Exception as e:  # one failing objective must not lose the others' results
      logging.exception("objective %s failed", name)
      rows.append({"objective": name, "experiment": OBJECTIVES[name].spec, "error": f"{type(e).__name__}: {e}"})
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    (out / "compare.md").write_text(markdown(rows))
  plot_losses(out_dir, names, out / "loss_curves.png")
  return rows
