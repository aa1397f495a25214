"""Fine-tuning a pretrained encoder on a downstream task (Devlin et al. 2019, §4).

BERT's recipe: the pretrained encoder plus a small task head, all parameters
trained end to end with Adam(W) (lr 2e-5..5e-5, weight decay 0.01, linear
warmup over the first 10% of steps then linear decay to 0), dropout 0.1, batch
16..32, 2..4 epochs, the best epoch chosen on the dev set.

This module is that loop, generic over a `spanlm.tasks.base.Task`:

    python -m spanlm.main --config=experiments/glue.py:rte --workdir=/tmp/rte \
        --config.init_checkpoint=/tmp/minilm

`config.init_checkpoint` is a converted checkpoint (`tools/import_checkpoint.py`,
a directory holding `spanlm_model.json`), a spanlm pretraining workdir (its
latest TrainState's `params.encoder`), or '' (random init from `config.model`,
for tests). Outputs in the workdir: metrics.jsonl (train loss every
`log_every` steps, dev metrics every epoch), results.json, predictions of the
best epoch on `config.task.predict_split`, an orbax checkpoint of the best
params (checkpoints/), and `model/`, the best encoder in the converted layout
(usable by tools/embed.py and `tools/import_checkpoint.py --to=hf`).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct

from spanlm import checkpoint as ckpt_lib
from spanlm import configs, parallel
from spanlm.metrics import MetricsWriter
from spanlm.models.bert import BertConfig, config_for
from spanlm.optim import make_optimizer
from spanlm.tasks.base import Features, Task


def finetune_config() -> ml_collections.ConfigDict:
  """base_config() plus the task, init checkpoint and epoch settings (BERT's fine-tuning defaults)."""
  c = configs.base_config()
  with c.unlocked():
    c.task = ml_collections.ConfigDict()
    c.task.name = ""  # task name (spanlm.tasks.get_task): sst2 | cola | mrpc | stsb | rte | ... | squad | bertsum
    c.task.data_dir = ""  # directory of the task's files (e.g. .../glue/SST-2 with train/dev/test.tsv)
    c.task.eval_split = "dev"  # split evaluated after every epoch ("" = none)
    c.task.predict_split = "test"  # split whose predictions are written with the best params ("" = none)
    c.task.max_train_examples = 0  # cap on training rows, first N of the file (0 = all); for CPU runs
    c.task.max_eval_examples = 0  # cap on evaluated rows (0 = all)
    c.init_checkpoint = ""  # converted dir (import_checkpoint.py), pretraining workdir, or "" = random init
    c.finetune = ml_collections.ConfigDict()
    c.finetune.num_epochs = 3  # passes over the training rows
    c.finetune.max_steps = 0  # stop after this many optimizer steps (0 = num_epochs decide)
    c.finetune.warmup_fraction = 0.1  # warmup steps = fraction * total steps (<0: use schedule.warmup_steps)
    c.finetune.eval_batch_size = 64  # rows per evaluation batch
    c.finetune.evals_per_epoch = 1  # dev evaluations per epoch (the best one is kept)
  c.model.dropout_rate = 0.1
  c.optimizer.learning_rate = 2e-5
  c.optimizer.weight_decay = 0.01
  c.optimizer.eps = 1e-6
  c.train.batch_size = 32
  c.train.seq_len = 128
  c.train.log_every = 50
  c.train.keep_checkpoints = 1
  c.schedule.name = "linear"
  return c


def validate(config) -> None:
  def fail(msg):
    raise ValueError(f"invalid config: {msg}")

  if not config.task.name:
    fail("config.task.name is empty; pick a task, e.g. --config=experiments/glue.py:sst2")
  f = config.finetune
  if f.num_epochs <= 0 and f.max_steps <= 0:
    fail("config.finetune.num_epochs and max_steps are both 0; set one of them")
  if f.eval_batch_size <= 0 or f.evals_per_epoch <= 0:
    fail("config.finetune.eval_batch_size and evals_per_epoch must be positive")
  if config.train.seq_len > config.model.max_position_embeddings:
    fail(f"config.train.seq_len={config.train.seq_len} exceeds max_position_embeddings="
         f"{config.model.max_position_embeddings}")


class FinetuneState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


# --- the encoder to start from -------------------------------------------------------------------
def load_encoder(config) -> tuple[BertConfig, Any, Any]:
  """(encoder config, encoder params as numpy or None, tokenizer) for `config.init_checkpoint`."""
  from spanlm.data import wordpiece

  path = config.init_checkpoint
  m = config.model
  common = dict(dropout_rate=m.dropout_rate, dtype=jnp.dtype(m.dtype),
                attention_impl=m.attention_impl or None, use_pooler=True,
                head_mask=m.head_mask,  # Kovaleva et al. 2019: heads disabled during fine-tuning
                scan_layers=m.get("scan_layers"))
  if not path:
    tok = wordpiece.load_tokenizer(config.data.tokenizer or wordpiece.SAMPLE_TOKENIZER)
    overrides = {k: m[k] for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size")
                 if m[k] is not None}
    cfg = config_for(m.size, vocab_size=tok.vocab_size, max_position_embeddings=m.max_position_embeddings,
                     **common, **overrides)
    logging.warning("config.init_checkpoint is empty: the encoder (%s) starts from random weights", m.size)
    return cfg, None, tok
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.init_checkpoint={path!r} is not a directory; give a converted "
                            f"checkpoint (tools/import_checkpoint.py --out=DIR) or a pretraining workdir")
  from spanlm import convert

  if convert.is_converted(path):
    cfg, params, tok = convert.load_converted(path, tokenizer=config.data.tokenizer or None)
    cfg = convert.with_overrides(cfg, **common)
    return cfg, params, tok
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return _load_pretraining_workdir(path, config, common)
  raise FileNotFoundError(f"config.init_checkpoint={path!r} holds neither spanlm_model.json (a converted "
                          f"checkpoint) nor checkpoints/ (a pretraining workdir)")


def _load_pretraining_workdir(workdir, config, common):
  """The latest pretraining TrainState's params['encoder'] and the run's own config and tokenizer."""
  import orbax.checkpoint as ocp

  from spanlm import train
  from spanlm.data import wordpiece

  with open(os.path.join(workdir, "config.json")) as f:
    pre = ml_collections.ConfigDict(json.load(f))
  tok_path = config.data.tokenizer or pre.data.get("tokenizer", "")
  if not tok_path:
    found = sorted(glob.glob(os.path.join(workdir, "data", "*", "*.model")))
    tok_path = found[0] if found else wordpiece.SAMPLE_TOKENIZER
  tok = wordpiece.load_tokenizer(tok_path)
  model = train.build_model(pre, tok.vocab_size)
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
  manager.close()
  raw = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  params = jax.tree.map(np.asarray, raw["params"]["encoder"])
  cfg = BertConfig(**{**{f: getattr(model.cfg, f) for f in BertConfig.__dataclass_fields__}, **common})
  logging.info("init from pretraining workdir %s, step %d (tokenizer %s)", workdir, step, tok_path)
  return cfg, params, tok


def merge_encoder(params, pretrained, prefix="encoder"):
  """Copy pretrained arrays into params[prefix]; new ones (e.g. a pooler) keep their init, logged."""
  import flax.traverse_util as tu

  from spanlm.models.bert import to_layout

  target = tu.flatten_dict(params[prefix])
  source = tu.flatten_dict(to_layout(pretrained, "layers" in params[prefix]))  # scanned or unrolled
  missing = [k for k in target if k not in source]
  unused = [k for k in source if k not in target]
  for k, v in source.items():
    if k in target:
      if tuple(target[k].shape) != tuple(v.shape):
        raise ValueError(f"init checkpoint parameter {'/'.join(k)} has shape {tuple(v.shape)}, the model "
                         f"expects {tuple(target[k].shape)}; the checkpoint's config does not match")
      target[k] = v
  if missing:
    logging.warning("%d encoder parameters not in the checkpoint, newly initialised: %s",
                    len(missing), ", ".join("/".join(k) for k in missing))
  if unused:
    logging.warning("%d checkpoint parameters unused: %s", len(unused), ", ".join("/".join(k) for k in unused))
  return {**params, prefix: tu.unflatten_dict(target)}


# --- the compiled pieces -------------------------------------------------------------------------
class Finetuner:
  """Compiled train/eval steps for `task` over an encoder; usable from a notebook or test."""

  def __init__(self, config, task: Task, encoder_cfg: BertConfig, example: dict[str, np.ndarray],
               num_steps: int, mesh=None):
    self.config, self.task = config, task
    self.mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    self.model = task.build_model(encoder_cfg)
    self.num_steps = num_steps
    cfg = copy.deepcopy(config)
    if config.finetune.warmup_fraction >= 0:
      cfg.schedule.warmup_steps = int(round(config.finetune.warmup_fraction * num_steps))
    self.tx, self.schedule = make_optimizer(cfg, num_steps)
    custom = task.optimizer(cfg, num_steps)
    if custom is not None:
      self.tx = custom
      # The logged learning rate: the task's own schedule when it has one (BERTSUM: the encoder's).
      self.schedule = getattr(task, "schedule", None) or self.schedule
    self.dp = parallel.data_parallel_size(self.mesh)
    for name, size in (("train.batch_size", config.train.batch_size),
                       ("finetune.eval_batch_size", config.finetune.eval_batch_size)):
      if size % self.dp:
        raise ValueError(f"config.{name}={size} is not divisible by the {self.dp} data-parallel devices")
    dummy = {k: jnp.zeros((1,) + v.shape[1:], v.dtype) for k, v in example.items()}
    dummy["example_mask"] = jnp.ones((1,), jnp.float32)
    self._dummy = dummy
    boxed = jax.eval_shape(self._init, jax.random.PRNGKey(0))
    param_sh = parallel.logical_shardings(boxed, self.mesh)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    rep = parallel.replicated(self.mesh)
    opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    self.param_shardings = param_sh
    self.state_shardings = FinetuneState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep)
    bs = parallel.batch_sharding(self.mesh)
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, bs),
                              out_shardings=(self.state_shardings, rep), donate_argnums=0)
    self.eval_step = jax.jit(self._eval_step, in_shardings=(param_sh, bs), out_shardings=bs)

  def _init(self, rng):
    return self.model.init({"params": rng, "dropout": rng}, self._dummy, deterministic=True)["params"]

  def init_state(self, seed: int, pretrained=None) -> FinetuneState:
    def init(key):
      init_key, loop_key = jax.random.split(key)
      params = nn.meta.unbox(self._init(init_key))
      return FinetuneState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, rng=loop_key)

    state = jax.jit(init, out_shardings=self.state_shardings.replace(opt_state=None))(jax.random.PRNGKey(seed))
    params = state.params
    if pretrained is not None:
      params = jax.device_put(merge_encoder(jax.device_get(params), pretrained), self.param_shardings)
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state)

  def _train_step(self, state, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      out = self.model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
      total, count = self.task.loss(out, batch)
      return total / jnp.maximum(count, 1.0), count

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=loss, grad_norm=optax.global_norm(grads), learning_rate=self.schedule(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _eval_step(self, params, batch):
    return self.model.apply({"params": params}, batch, deterministic=True)

  def outputs(self, params, features: Features) -> dict[str, np.ndarray]:
    """Model outputs for every row of `features` (numpy, padding rows removed)."""
    b = self.config.finetune.eval_batch_size
    n = len(features)
    chunks = []
    for start in range(0, n, b):
      batch = _rows(features.arrays, np.arange(start, min(start + b, n)), b)
      out = self.eval_step(params, parallel.global_batch(batch, self.mesh))
      chunks.append(jax.tree.map(np.asarray, _gather(out)))
    if not chunks:
      return {}
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *chunks)


def _rows(arrays, idx, size):
  """Rows `idx` padded (by repeating row 0) to `size`, with example_mask 1 on real rows."""
  pad = size - len(idx)
  full = np.concatenate([idx, np.full(pad, idx[0] if len(idx) else 0, idx.dtype)]) if pad else idx
  batch = {k: v[full] for k, v in arrays.items()}
  batch["example_mask"] = (np.arange(size) < len(idx)).astype(np.float32)
  return batch


def _gather(tree):
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def _cap(features: Features, limit: int) -> Features:
  if not limit or len(features) <= limit:
    return features
  meta = features.meta
  if isinstance(meta, list):
    meta = meta[:limit]
  report = {**features.report, "capped_rows": len(features) - limit}
  return Features({k: v[:limit] for k, v in features.arrays.items()}, meta, report)


# --- the loop ------------------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tune and evaluate as `config` says; returns the best dev metrics."""
  from spanlm.tasks import get_task

  validate(config)
  if jax.process_count() > 1:
    raise NotImplementedError("fine-tuning runs on one process (any number of local devices); "
                              "multi-host fine-tuning is not implemented")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  task = get_task(config.task.name, config)
  encoder_cfg, pretrained, tokenizer = load_encoder(config)
  seq_len = config.train.seq_len
  train_data = _cap(task.load("train", tokenizer, seq_len), config.task.max_train_examples)
  train_data.log_report(f"{task.name}/train")
  if len(train_data) == 0:
    raise ValueError(f"task {task.name}: no usable training rows in {config.task.data_dir!r} (see the log)")
  eval_data = None
  if config.task.eval_split:
    eval_data = _cap(task.load(config.task.eval_split, tokenizer, seq_len), config.task.max_eval_examples)
    eval_data.log_report(f"{task.name}/{config.task.eval_split}")
  b = config.train.batch_size
  steps_per_epoch = max(len(train_data) // b, 1)
  num_steps = steps_per_epoch * max(config.finetune.num_epochs, 1)
  if config.finetune.max_steps:
    num_steps = min(num_steps, config.finetune.max_steps) if config.finetune.num_epochs > 0 \
        else config.finetune.max_steps
  tuner = Finetuner(config, task, encoder_cfg, train_data.arrays, num_steps)
  state = tuner.init_state(config.seed, pretrained)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("task %s: %.2fM parameters, %d train rows, %d steps (%d per epoch, batch %d x %d tokens), "
               "mesh %s", task.name, n_params / 1e6, len(train_data), num_steps, steps_per_epoch, b,
               seq_len, dict(tuner.mesh.shape))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  writer = MetricsWriter(workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=1, async_save=False)
  eval_points = {int(round(steps_per_epoch * (i + 1) / config.finetune.evals_per_epoch))
                 for i in range(config.finetune.evals_per_epoch)}
  best, best_step, best_params, history = None, 0, None, []
  rng = np.random.default_rng(config.seed)
  tick, step, order = time.time(), 0, np.zeros(0, np.int64)
  try:
    while step < num_steps:
      pos = step % steps_per_epoch
      if pos == 0:
        order = rng.permutation(len(train_data))
        if len(order) < b:  # fewer rows than a batch: repeat them
          order = np.resize(order, b)
      batch = _rows(train_data.arrays, order[pos * b:(pos + 1) * b], b)
      state, metrics = tuner.train_step(state, parallel.global_batch(batch, tuner.mesh))
      step += 1
      history.append(metrics)
      if step % config.train.log_every == 0 or step == num_steps:
        means = {k: float(np.mean(v)) for k, v in jax.device_get(
            jax.tree.map(lambda *xs: jnp.stack(xs), *history)).items()}
        history = []
        rate = config.train.log_every / max(time.time() - tick, 1e-9)
        tick = time.time()
        writer.write(step, {"train/loss": means["loss"], "train/grad_norm": means["grad_norm"],
                            "learning_rate": means["learning_rate"], "epoch": step / steps_per_epoch})
        logging.info("step %d/%d | epoch %.2f | loss %.4f | lr %.2e | %.2f steps/s", step, num_steps,
                     step / steps_per_epoch, means["loss"], means["learning_rate"], rate)
      if eval_data is not None and ((step - 1) % steps_per_epoch + 1 in eval_points or step == num_steps):
        result = evaluate(tuner, state.params, eval_data)
        writer.write(step, {f"eval/{k}": v for k, v in result.items()})
        logging.info("eval step %d (epoch %.2f) | %s", step, step / steps_per_epoch,
                     " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
        score = result[task.metric]
        if best is None or (score > best[task.metric] if task.higher_is_better else score < best[task.metric]):
          best, best_step = result, step
          best_params = jax.device_get(state.params)
          checkpointer.save(step, state.params, {"step": step, "metrics": result})
    if best_params is None:  # no dev split: the final params
      best_params, best_step = jax.device_get(state.params), step
      checkpointer.save(step, state.params, {"step": step})
  finally:
    checkpointer.close()
    writer.close()

  from spanlm import convert
  convert.save_converted(os.path.join(workdir, "model"), encoder_cfg, best_params["encoder"], tokenizer)
  out = {"task": task.name, "steps": num_steps, "best_step": best_step}
  if best is not None:
    out.update({f"best/{k}": v for k, v in best.items()})
  if config.task.predict_split:
    out["prediction_files"] = _predict(tuner, task, best_params, tokenizer, seq_len, workdir)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=2)
  logging.info("done: best %s at step %d; results in %s", best, best_step, workdir)
  return out


def evaluate(tuner: Finetuner, params, features: Features) -> dict[str, float]:
  outputs = tuner.outputs(params, features)
  predictions = tuner.task.predict(outputs, features)
  return {k: float(v) for k, v in tuner.task.evaluate(predictions, features).items()}


def _predict(tuner, task, params, tokenizer, seq_len, workdir) -> list[str]:
  split = tuner.config.task.predict_split
  try:
    features = task.load(split, tokenizer, seq_len)
  except FileNotFoundError as e:
    logging.warning("no %s predictions: %s", split, e)
    return []
  features.log_report(f"{task.name}/{split}")
  params = jax.device_put(params, tuner.param_shardings)
  predictions = task.predict(tuner.outputs(params, features), features)
  paths = task.write_predictions(predictions, features, os.path.join(workdir, f"predictions_{split}"))
  for p in paths:
    logging.info("wrote %s predictions to %s", split, p)
  return paths
