"""Pretraining: the jitted, sharded train step and the loop around it.

One compiled step does everything on device: mask the global batch (nothing
random on the host), run the encoder and heads on each micro-batch, sum the
gradients, normalise once by the global number of predicted tokens, clip, and
apply the optax update. The state and the batch enter with explicit
NamedShardings over the (data, fsdp, model) mesh; the compiler partitions the
rest.
"""

from __future__ import annotations

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
from spanlm import configs, masking, objectives, parallel
from spanlm.metrics import MetricsWriter
from spanlm.models.bert import config_for
from spanlm.models.heads import BertForPretraining
from spanlm.optim import make_optimizer

class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array  # base key; step s uses fold_in(rng, s), so resuming replays the same randomness


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> BertForPretraining:
  """The pretraining model for `config.model`/`config.objective` and a tokenizer's vocabulary."""
  m = config.model
  multiple = max(int(m.vocab_multiple), 1)
  overrides = {k: m[k] for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size")
               if m[k] is not None}
  cfg = config_for(
      m.size, vocab_size=-(-vocab_size // multiple) * multiple,
      max_position_embeddings=m.max_position_embeddings, dropout_rate=m.dropout_rate,
      dtype=jnp.dtype(m.dtype), attention_impl=m.attention_impl or None, **overrides)
  return BertForPretraining(cfg, sbo=bool(config.objective.sbo),
                            max_span_tokens=int(config.objective.max_span_tokens))


class Trainer:
  """The compiled pieces of a pretraining run, usable from a notebook.

    trainer = Trainer(config, vocab_size, word_start_table, mesh)
    state = trainer.init_state()
    state, metrics = trainer.train_step(state, {'input_ids': ..., 'segment_ids': ...})
  """

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int,
               word_start_table: np.ndarray, mesh: jax.sharding.Mesh | None = None):
    configs.validate(config)
    self.config = config
    self.vocab_size = vocab_size
    self.mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    self.model = build_model(config, vocab_size)
    self.tx, self.schedule = make_optimizer(config, config.train.num_steps)
    self.seq_len = config.train.seq_len
    self.num_predictions = masking.max_predictions(self.seq_len, config.masking.rate)
    self.word_start_table = jnp.asarray(word_start_table, dtype=bool)
    if self.word_start_table.shape != (vocab_size,):
      raise ValueError(f"word_start_table has shape {self.word_start_table.shape}, "
                       f"expected ({vocab_size},) for the tokenizer's vocabulary")
    dp = parallel.data_parallel_size(self.mesh)
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % dp:
      raise ValueError(
          f"micro-batch of {micro} sequences (batch_size {config.train.batch_size} / "
          f"grad_accum_steps {config.train.grad_accum_steps}) is not divisible by the "
          f"{dp} data-parallel devices; change config.train.batch_size or config.mesh")
    self._build_shardings()
    self.train_step = jax.jit(
        self._train_step, in_shardings=(self.state_shardings, self.batch_shardings),
        out_shardings=(self.state_shardings, parallel.replicated(self.mesh)), donate_argnums=0)
    self.eval_step = jax.jit(
        self._eval_step, in_shardings=(self.state_shardings.params, self.batch_shardings, None),
        out_shardings=parallel.replicated(self.mesh))

  # --- state -------------------------------------------------------------------------------
  def _dummy_inputs(self):
    ids = jnp.zeros((1, self.seq_len), jnp.int32)
    pos = jnp.zeros((1, self.num_predictions), jnp.int32)
    return ids, ids, ids != masking.PAD_ID, pos, pos, pos + 1

  def _init(self, rng):
    return self.model.init({"params": rng}, *self._dummy_inputs())["params"]

  def _build_shardings(self):
    boxed = jax.eval_shape(self._init, jax.random.PRNGKey(0))
    param_shardings = parallel.logical_shardings(boxed, self.mesh)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    rep = parallel.replicated(self.mesh)
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    self.state_shardings = TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep)
    self.abstract_state = ckpt_lib.abstract_like(
        TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                   opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32)),
        self.state_shardings)
    bs = parallel.batch_sharding(self.mesh)
    self.batch_shardings = {"input_ids": bs, "segment_ids": bs}

  def init_state(self, seed: int | None = None) -> TrainState:
    """Parameters and optimizer state created directly in their shardings."""
    seed = self.config.seed if seed is None else seed

    def init(key):
      init_key, loop_key = jax.random.split(key)
      params = nn.meta.unbox(self._init(init_key))
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=self.tx.init(params), rng=loop_key)

    return jax.jit(init, out_shardings=self.state_shardings)(jax.random.PRNGKey(seed))

  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))

  # --- steps -------------------------------------------------------------------------------
  def mask(self, rng, input_ids) -> masking.MaskedBatch:
    return masking.apply_masking(rng, input_ids, self.word_start_table, self.config.masking,
                                 vocab_size=self.vocab_size)

  def _prepare(self, rng, batch):
    """Mask the whole batch once, then gather the P predicted positions per row."""
    masked = self.mask(rng, batch["input_ids"])
    preds = objectives.select_predictions(masked, self.num_predictions)
    return dict(input_ids=masked.input_ids, segment_ids=batch["segment_ids"],
                attention_mask=batch["input_ids"] != masking.PAD_ID, positions=preds.positions,
                targets=preds.targets, weights=preds.weights, left=preds.left, right=preds.right)

  def _sums(self, params, mb, dropout_rng, deterministic):
    preds = objectives.Predictions(mb["positions"], mb["targets"], mb["weights"], mb["left"], mb["right"])
    outputs = self.model.apply(
        {"params": params}, mb["input_ids"], mb["segment_ids"], mb["attention_mask"],
        preds.positions, preds.left, preds.right, deterministic=deterministic,
        rngs=None if deterministic else {"dropout": dropout_rng})
    return objectives.pretraining_sums(outputs, preds, self.vocab_size)

  def _train_step(self, state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    mask_rng, dropout_rng = jax.random.split(rng)
    prepared = self._prepare(mask_rng, batch)
    sbo_weight = self.config.objective.sbo_weight

    def loss_fn(params, mb, key):
      sums = self._sums(params, mb, key, deterministic=False)
      return objectives.total_loss(sums, sbo_weight), sums

    grad_fn = jax.grad(loss_fn, has_aux=True)
    accum = self.config.train.grad_accum_steps
    if accum == 1:
      grads, sums = grad_fn(state.params, prepared, dropout_rng)
    else:
      # Micro-batch j takes rows j, j+A, j+2A, ...: each device keeps its own rows.
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                           prepared)

      def body(carry, inputs):
        i, mb = inputs
        g, s = grad_fn(state.params, mb, jax.random.fold_in(dropout_rng, i))
        return jax.tree.map(jnp.add, carry, (g, s)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params,
                                                          jax.tree.map(lambda x: x[0], micro), dropout_rng))
      (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    # Loss and gradient per predicted token over the whole global batch.
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["num_predictions"], 1.0), grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = objectives.summarize(sums, sbo_weight)
    metrics.update(grad_norm=optax.global_norm(grads), learning_rate=self.schedule(state.step),
                   predictions_per_row=sums["num_predictions"] / batch["input_ids"].shape[0])
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _eval_step(self, params, batch, rng):
    return self._sums(params, self._prepare(rng, batch), None, deterministic=True)

  def evaluate(self, params, batches, seed: int | None = None) -> dict:
    """Held-out MLM loss/accuracy/perplexity with a fixed masking RNG, comparable across steps."""
    key = jax.random.PRNGKey(self.config.seed if seed is None else seed)
    key = jax.random.fold_in(key, 0x5EED)  # distinct from every training step's key
    totals = None
    for i, batch in enumerate(batches):
      sums = self.eval_step(params, parallel.global_batch(batch, self.mesh), jax.random.fold_in(key, i))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
      raise ValueError("no held-out batches to evaluate")
    out = objectives.summarize(jax.device_get(totals), self.config.objective.sbo_weight)
    result = {"eval/mlm_loss": float(out["mlm_loss"]), "eval/mlm_accuracy": float(out["mlm_accuracy"]),
              "eval/perplexity": float(np.exp(min(out["mlm_loss"], 50.0))),
              "eval/num_predictions": float(totals["num_predictions"])}
    if "sbo_loss" in out:
      result["eval/sbo_loss"] = float(out["sbo_loss"])
      result["eval/sbo_accuracy"] = float(out["sbo_accuracy"])
    return result


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _local_rows(batch: dict) -> dict:
  """This process's rows of a host-global eval batch (all rows on one process)."""
  n, i = jax.process_count(), jax.process_index()
  rows = len(batch["input_ids"]) // n
  return {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrain as `config` says, resuming from `workdir` if it holds a checkpoint.

  Returns the last logged train metrics and the last evaluation.
  """
  from spanlm.data import pipeline, prepare  # data is only needed by the loop
  from spanlm.data.tokenizer import Tokenizer

  configs.validate(config)
  workdir = os.path.abspath(workdir)
  _check_workdir(workdir)
  t = config.train
  data_dir = prepare.ensure_prepared(
      config.data.corpus, workdir, t.seq_len, tokenizer=config.data.tokenizer,
      vocab_size=config.data.vocab_size, validation_fraction=config.data.validation_fraction)
  dataset = prepare.load_prepared(data_dir)
  tokenizer = Tokenizer.load(dataset.tokenizer_path)
  if dataset.vocab_size != tokenizer.vocab_size:
    raise ValueError(f"prepared dataset {data_dir} was written with a vocabulary of "
                     f"{dataset.vocab_size}, but its tokenizer has {tokenizer.vocab_size}; re-prepare it")
  mesh = parallel.make_mesh(config.mesh)
  trainer = Trainer(config, tokenizer.vocab_size, tokenizer.word_start_table(), mesh)
  logging.info("model: %s, %.2fM parameters; mesh %s; %d train / %d held-out rows of %d tokens",
               config.model.size, trainer.num_params() / 1e6, dict(mesh.shape),
               len(dataset.train), len(dataset.validation), t.seq_len)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  train_iter = pipeline.train_iterator(dataset.train, global_batch_size=t.batch_size, seed=config.seed,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
  eval_data = [_local_rows(b) for b in pipeline.eval_batches(
      dataset.validation, batch_size=t.batch_size, max_batches=t.eval_batches or None)]
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=t.keep_checkpoints)
  start = checkpointer.latest_step()
  if start is None:
    state = trainer.init_state()
    start = 0
  else:
    state, data_state = checkpointer.restore(start, trainer.abstract_state)
    train_iter.set_state(data_state["iterator"])
    logging.info("resumed from %s at step %d", checkpointer.directory, start)
  last = min(t.stop_at_step, t.num_steps) if t.stop_at_step else t.num_steps
  if start >= last:
    logging.info("run is complete: step %d of %d already done in %s (raise "
                 "config.train.num_steps/stop_at_step or use a new --workdir to train more)",
                 start, last, workdir)
    checkpointer.close()
    return {"step": start, "complete": True}

  writer = MetricsWriter(workdir)
  tokens_per_step = t.batch_size * t.seq_len
  history, last_eval, last_train = [], {}, {}
  tick, tick_step = time.time(), start
  step = start
  try:
    for step in range(start + 1, last + 1):
      local = next(train_iter)
      state, metrics = trainer.train_step(state, parallel.global_batch(local, mesh))
      history.append(metrics)
      if step % t.log_every == 0 or step == last:
        means = {k: float(np.mean(v)) for k, v in jax.device_get(
            jax.tree.map(lambda *xs: jnp.stack(xs), *history)).items()}
        history = []
        elapsed = time.time() - tick
        steps_per_sec = (step - tick_step) / max(elapsed, 1e-9)
        tick, tick_step = time.time(), step
        last_train = {f"train/{k}": v for k, v in means.items() if k != "learning_rate"}
        last_train.update(learning_rate=means["learning_rate"], steps_per_sec=steps_per_sec,
                          tokens_per_sec=steps_per_sec * tokens_per_step)
        writer.write(step, last_train)
        sbo = f" | sbo {means['sbo_loss']:.3f}" if "sbo_loss" in means else ""
        logging.info("step %d/%d | loss %.3f | mlm %.3f acc %.3f%s | lr %.2e | %.2f steps/s | "
                     "%.0f tok/s | ETA %s", step, t.num_steps, means["loss"], means["mlm_loss"],
                     means["mlm_accuracy"], sbo, means["learning_rate"], steps_per_sec,
                     steps_per_sec * tokens_per_step,
                     _format_eta((t.num_steps - step) / max(steps_per_sec, 1e-9)))
      if (t.eval_every and step % t.eval_every == 0) or step == last:
        last_eval = trainer.evaluate(state.params, eval_data)
        writer.write(step, last_eval)
        logging.info("eval step %d | held-out mlm loss %.3f | acc %.3f | ppl %.1f%s", step,
                     last_eval["eval/mlm_loss"], last_eval["eval/mlm_accuracy"],
                     last_eval["eval/perplexity"],
                     f" | sbo {last_eval['eval/sbo_loss']:.3f}" if "eval/sbo_loss" in last_eval else "")
      if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == last:
        checkpointer.save(step, state, {"iterator": train_iter.get_state()})
  finally:
    checkpointer.close()
    writer.close()
  logging.info("done: step %d, checkpoint in %s", step, checkpointer.directory)
  return {"step": step, **last_train, **last_eval}


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"workdir {workdir} is not writable ({e.strerror}); choose another --workdir") from e
