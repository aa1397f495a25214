"""Disable one attention head at a time in a fine-tuned model and measure the dev metric.

  python tools/ablate_heads.py --workdir=FINETUNE_WORKDIR [--max_eval_examples=N] [--out=DIR]

--workdir is a fine-tuning run of `python -m spanlm.main --config=experiments/glue.py:TASK`
(its config.json, best checkpoint and model/). Head (l, h) is disabled by zeroing its rows
of the attention output projection, which equals `config.model.head_mask='l:h'`
(Michel et al. 2019 ablate heads the same way). Writes ablation.json and ablation.png
(layer x head heatmap of the metric change) to --out (default WORKDIR/head_ablation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--max_eval_examples", type=int, default=0, help="0 = the run's own setting")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  import numpy as np

  from spanlm import checkpoint, convert, finetune, heads_analysis
  from spanlm.tasks import get_task

  workdir = os.path.abspath(args.workdir)
  out_dir = args.out or os.path.join(workdir, "head_ablation")
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
    if "task" not in saved:
      raise ValueError(f"{workdir} is not a fine-tuning workdir (its config.json has no 'task')")
    config = finetune.finetune_config()
    for group, values in saved.items():
      if isinstance(values, dict) and group in config:
        for k, v in values.items():
          if k in config[group] and not isinstance(v, dict):
            config[group][k] = v
    if args.max_eval_examples:
      config.task.max_eval_examples = args.max_eval_examples
    task = get_task(config.task.name, config)
    encoder_cfg, _, tokenizer = convert.load_converted(os.path.join(workdir, "model"))
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    params, meta = checkpoint.read_raw(os.path.join(workdir, "checkpoints", str(steps[-1])))
    eval_data = finetune._cap(task.load(config.task.eval_split, tokenizer, config.train.seq_len),
                              config.task.max_eval_examples)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  tuner = finetune.Finetuner(config, task, encoder_cfg, eval_data.arrays, num_steps=1)
  start = time.time()
  result = heads_analysis.ablate(lambda p: finetune.evaluate(tuner, p, eval_data)[task.metric], params,
                                 encoder_cfg.num_layers, encoder_cfg.num_heads)
  delta = np.asarray(result["delta"])
  worst = np.unravel_index(np.argmin(delta), delta.shape)
  best = np.unravel_index(np.argmax(delta), delta.shape)
  summary = {"task": task.name, "metric": task.metric, "eval_split": config.task.eval_split,
             "eval_examples": len(eval_data), "checkpoint_step": steps[-1], "seconds": time.time() - start,
             **result}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "ablation.json"), "w") as f:
    json.dump(summary, f, indent=1)
  heads_analysis.plot_ablation(result, task.metric, os.path.join(out_dir, "ablation.png"),
                               f"{task.name} {config.task.eval_split} ({len(eval_data)} rows): "
                               f"{task.metric} change per disabled head")
  print(f"{task.name}: {task.metric} {result['base']:.4f} with all heads; one head off: "
        f"worst L{worst[0]}H{worst[1]} {delta[worst]:+.4f}, best L{best[0]}H{best[1]} {delta[best]:+.4f}, "
        f"{(delta < 0).sum()} of {delta.size} heads hurt when removed; wrote {out_dir}/ablation.json, ablation.png")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
