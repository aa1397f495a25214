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


def load_run(workdir, max_eval_examples: int = 0):
  """(Workdir, config, task, encoder config, tokenizer) of a finished fine-tuning workdir (local or gs://)."""
  from spanlm import convert, finetune, paths
  from spanlm.tasks import get_task
  from spanlm.workdir import Workdir

  paths.check_bucket(workdir)
  wd = Workdir(workdir)
  if not wd.has_config():
    raise ValueError(f"{wd} has no config.json; give the --workdir of a fine-tuning run")
  saved = json.loads(wd.config_file.read_text())
  if "task" not in saved:
    raise ValueError(f"{wd} is not a fine-tuning workdir (its config.json has no 'task')")
  config = finetune.finetune_config(saved["task"]["name"])
  for group, values in saved.items():
    if isinstance(values, dict) and group in config:
      for k, v in values.items():
        if k in config[group] and not isinstance(v, dict):
          config[group][k] = tuple(v) if isinstance(v, list) else v
  if max_eval_examples:
    config.task.max_eval_examples = max_eval_examples
  task = get_task(config.task.name, config)
  model = wd.root / "model"
  if not wd.has_checkpoints() or not convert.is_converted(model):
    raise ValueError(f"{wd} holds no finished fine-tuning run (checkpoints/ and model/); rerun its command")
  encoder_cfg, _, tokenizer = convert.load_converted(str(model))
  return wd, config, task, encoder_cfg, tokenizer


def best_params(wd, tuner):
  """(step, the best params as NumPy) of the newest intact checkpoint, restored through the Workdir's
  Checkpointer into the fine-tuning state's layout (its checksum verified; a corrupt one falls back)."""
  import jax

  abstract = tuner.abstract_state
  step, tree, _ = wd.latest({"train": abstract, "best": abstract.params})
  return step, jax.device_get(tree["best"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--mode", choices=("zero", "uniform"), default="zero",
                      help="zero: remove the head's output (Michel et al.); uniform: uniform attention (Kovaleva et al.)")
  parser.add_argument("--max_eval_examples", type=int, default=0, help="0 = the run's own setting")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  import numpy as np

  from spanlm import finetune, heads_analysis, paths

  try:
    paths.check_bucket(args.out or args.workdir)
    wd, config, task, encoder_cfg, tokenizer = load_run(args.workdir, args.max_eval_examples)
    out_dir = paths.path(args.out) if args.out else wd.root / "head_ablation"  # local or gs://
    eval_data = finetune._cap(task.load(config.task.eval_split, tokenizer, config.train.seq_len),
                              config.task.max_eval_examples)
    tuner = finetune.Finetuner(config, task, encoder_cfg, eval_data.arrays, num_steps=1)
    step, params = best_params(wd, tuner)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
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
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f"ablation_{args.mode}.json").write_text(json.dumps(summary, indent=1))
  heads_analysis.plot_ablation(result, task.metric, out_dir / f"ablation_{args.mode}.png",
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
