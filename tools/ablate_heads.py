"""Disable one attention head at a time in a fine-tuned model and measure the dev metric.

  python tools/ablate_heads.py --workdir=FINETUNE_WORKDIR [--mode=zero|uniform] [--max_eval_examples=N] [--out=DIR]

--workdir is a fine-tuning run of `python -m spanlm.main --config=experiments/glue.py:TASK`
(its config.json, checkpoint with the best params, and model/). Two ways to disable head (l, h):

  zero     its output is removed (Michel et al. 2019, "Are Sixteen Heads Really Better than
           One?": the head's gate xi_h = 0). Done by zeroing its rows of the attention output
           projection, which equals `config.model.head_mask='l:h'` (tests/test_heads.py).
  uniform  its attention weights are replaced by a uniform distribution over the (unpadded)
           tokens, so it still passes on the mean of its values (Kovaleva et al. 2019, "Revealing
           the Dark Secrets of BERT", §6: "disabling" a head sets its attention to equal values).
           Done by zeroing its query weights and bias: every score q.k is then 0, and the
           softmax over the unmasked keys is uniform (tested).

Writes ablation_<mode>.json and ablation_<mode>.png (layer x head heatmap of the metric change)
to --out (default WORKDIR/head_ablation).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time


def uniform_head(encoder_params: dict, layer: int, head: int) -> dict:
  """Encoder params in which (layer, head) attends uniformly: its query kernel and bias are zero."""
  import numpy as np

  out = copy.copy(encoder_params)
  layer_p = out[f"layer_{layer}"] = copy.copy(out[f"layer_{layer}"])
  attn = layer_p["attention"] = copy.copy(layer_p["attention"])
  query = attn["query"] = copy.copy(attn["query"])
  kernel, bias = np.array(query["kernel"]), np.array(query["bias"])  # [hidden, heads, dim], [heads, dim]
  kernel[:, head] = 0.0
  bias[head] = 0.0
  query["kernel"], query["bias"] = kernel, bias
  return out


def load_run(workdir: str, max_eval_examples: int = 0):
  """(config, task, encoder config, tokenizer, best params, checkpoint step) of a fine-tuning workdir."""
  from spanlm import checkpoint, convert, finetune
  from spanlm.tasks import get_task

  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  if "task" not in saved:
    raise ValueError(f"{workdir} is not a fine-tuning workdir (its config.json has no 'task')")
  config = finetune.finetune_config(saved["task"]["name"])
  for group, values in saved.items():
    if isinstance(values, dict) and group in config:
      for k, v in values.items():
        if k in config[group] and not isinstance(v, dict):
          config[group][k] = tuple(v) if isinstance(v, list) else v
  if max_eval_examples:
    config.task.max_eval_examples = max_eval_examples
  task = get_task(config.task.name, config)
  encoder_cfg, _, tokenizer = convert.load_converted(os.path.join(workdir, "model"))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) if os.path.isdir(ckpt_dir) else []
  if not steps or not os.path.isdir(os.path.join(workdir, "model")):
    raise ValueError(f"{workdir} holds no finished fine-tuning run (checkpoints/ and model/); rerun its command")
  raw, _ = checkpoint.read_raw(os.path.join(ckpt_dir, str(steps[-1])))
  params = raw["best"] if "best" in raw else raw  # {'train': TrainState, 'best': params}
  return config, task, encoder_cfg, tokenizer, params, steps[-1]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--mode", choices=("zero", "uniform"), default="zero",
                      help="zero: remove the head's output (Michel et al.); uniform: uniform attention (Kovaleva et al.)")
  parser.add_argument("--max_eval_examples", type=int, default=0, help="0 = the run's own setting")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  import numpy as np

  from spanlm import finetune, heads_analysis

  workdir = os.path.abspath(args.workdir)
  out_dir = args.out or os.path.join(workdir, "head_ablation")
  try:
    config, task, encoder_cfg, tokenizer, params, step = load_run(workdir, args.max_eval_examples)
    eval_data = finetune._cap(task.load(config.task.eval_split, tokenizer, config.train.seq_len),
                              config.task.max_eval_examples)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  tuner = finetune.Finetuner(config, task, encoder_cfg, eval_data.arrays, num_steps=1)
  start = time.time()
  score = lambda p: finetune.evaluate(tuner, p, eval_data)[task.metric]
  if args.mode == "zero":
    result = heads_analysis.ablate(score, params, encoder_cfg.num_layers, encoder_cfg.num_heads)
  else:
    base = float(score(params))
    scores = np.zeros((encoder_cfg.num_layers, encoder_cfg.num_heads))
    for layer in range(encoder_cfg.num_layers):
      for head in range(encoder_cfg.num_heads):
        scores[layer, head] = score({**params, "encoder": uniform_head(params["encoder"], layer, head)})
    result = {"base": base, "scores": scores.tolist(), "delta": (scores - base).tolist()}
  delta = np.asarray(result["delta"])
  worst = np.unravel_index(np.argmin(delta), delta.shape)
  best = np.unravel_index(np.argmax(delta), delta.shape)
  summary = {"task": task.name, "metric": task.metric, "mode": args.mode, "eval_split": config.task.eval_split,
             "eval_examples": len(eval_data), "checkpoint_step": step, "seconds": time.time() - start, **result}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"ablation_{args.mode}.json"), "w") as f:
    json.dump(summary, f, indent=1)
  heads_analysis.plot_ablation(result, task.metric, os.path.join(out_dir, f"ablation_{args.mode}.png"),
                               f"{task.name} {config.task.eval_split} ({len(eval_data)} rows): "
                               f"{task.metric} change per head ({args.mode})")
  print(f"{task.name}: {task.metric} {result['base']:.4f} with all heads; one head {args.mode}: "
        f"worst L{worst[0]}H{worst[1]} {delta[worst]:+.4f}, best L{best[0]}H{best[1]} {delta[best]:+.4f}, "
        f"{(delta < 0).sum()} of {delta.size} heads hurt when disabled; wrote "
        f"{out_dir}/ablation_{args.mode}.json, .png")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
