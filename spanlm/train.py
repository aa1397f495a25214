"""Pretraining: the jitted, sharded train step and the loop around it.

One compiled step does everything on device: prepare the global batch (masking,
pair building: nothing random on the host), compute the loss denominators over
the whole global batch, run the model on each micro-batch, sum the gradients of
the (already normalised, linear-in-sums) loss, clip, and apply the optax update.
The state and the batch enter with explicit NamedShardings over the (data,
fsdp, model) mesh; the compiler partitions the rest.

What is computed is pluggable: `config.objective.name` picks an `Objective`
(spanlm/objectives/: mlm | mlm_nsp | mlm_sop | ...) that provides the model,
`prepare`, `denominators`, `sums`, `loss` and `metrics`; non-trained loss inputs
(a distillation teacher) come from `objective.frozen_inputs(mesh)` and enter the
jitted step as an explicit third argument, never as HLO constants.
"""

from __future__ import annotations

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
from spanlm import configs, parallel, resilience
from spanlm.objectives import base as pretraining
from spanlm.objectives import masking
from spanlm.metrics import MetricsWriter, plot_curves, trim_metrics, unigram_neg_log_probs
from spanlm.models.heads import BertForPretraining
from spanlm.optim import ewc, make_optimizer, opt_state_shardings, optimizer_metrics

# Extra per-token features of packed rows (config.data.packing='packed'), passed to the model.
PACKED_KEYS = pretraining.PACKED_KEYS


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array  # base key; step s uses fold_in(rng, s), so resuming replays the same randomness


def state_layout(init_params, tx, mesh) -> tuple[TrainState, TrainState]:
  """(shardings, abstract state) of the TrainState for boxed `init_params(rng)` and optimizer `tx`.

  The one place both loops (pretraining here, fine-tuning in finetune.py) derive their state
  layout: parameters by their logical axes, optimizer state like its parameters
  (`opt_state_shardings`, which keeps parameter groups' MaskedNodes), the rest replicated.
  """
  boxed = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  param_shardings = parallel.logical_shardings(boxed, mesh)
  abstract_params = nn.meta.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  rep = parallel.replicated(mesh)
  opt_shardings = opt_state_shardings(tx, abstract_opt, param_shardings, rep)
  shardings = TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep)
  abstract = ckpt_lib.abstract_like(
      TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                 opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32)), shardings)
  return shardings, abstract


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> BertForPretraining:
  """The masked-LM pretraining model for `config.model`/`config.objective` and a vocabulary.

  (Trainer builds its model through the objective: `pretraining.make_objective`; model
  keys such as remat/embedding_size are mapped in `pretraining.encoder_config`.)
  """
  cfg = pretraining.encoder_config(config, vocab_size)
  return BertForPretraining(cfg, sbo=bool(config.objective.sbo),
                            sbo_max_targets=int(config.objective.sbo_max_targets),
                            sbo_position_size=int(config.objective.sbo_position_size))


class Trainer:
  """The compiled pieces of a pretraining run, usable from a notebook.

    trainer = Trainer(config, vocab_size, word_start_table, mesh)
    state = trainer.init_state()
    state, metrics = trainer.train_step(state, {'input_ids': ..., 'segment_ids': ...})
  """

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int,
               word_start_table: np.ndarray, mesh: jax.sharding.Mesh | None = None,
               optimizer: tuple[optax.GradientTransformation, optax.Schedule] | None = None):
    # `optimizer`: (tx, schedule) replacing make_optimizer(config), e.g. the LR range test's ramp.
    configs.validate(config)
    self.config = config
    self.vocab_size = vocab_size
    self.mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    self.objective = pretraining.make_objective(config, vocab_size, word_start_table)
    self.model = self.objective.model
    self.tx, self.schedule = optimizer or make_optimizer(config, config.train.num_steps)
    self.seq_len = config.train.seq_len
    self._poisoned_steps = resilience.parse_steps(config.train.get("inject_nonfinite_steps", ""))
    self.num_predictions = masking.max_predictions(self.seq_len, config.masking.rate, config.masking.get("max_predictions", 0))
    self.word_start_table = self.objective.word_start_table
    dp = parallel.data_parallel_size(self.mesh)
    micro = config.train.batch_size // config.train.grad_accum_steps
    if micro % dp:
      raise ValueError(
          f"micro-batch of {micro} sequences (batch_size {config.train.batch_size} / "
          f"grad_accum_steps {config.train.grad_accum_steps}) is not divisible by the "
          f"{dp} data-parallel devices; change config.train.batch_size or config.mesh")
    self._build_shardings()
    # EWC (optim/ewc.py): params -> (lambda/2) sum F (theta - theta*_A)^2; None when config.ewc is off.
    self.penalty = ewc.make_penalty(config.get("ewc"), self.abstract_state.params)
    # Non-trained inputs of the loss (e.g. a teacher's params): an explicit argument of the
    # jitted steps (sharding taken from the arrays), bound here so the public steps keep
    # their signatures.
    self.frozen = self.objective.frozen_inputs(self.mesh)
    self._train_step_jit = jax.jit(
        self._train_step, in_shardings=(self.state_shardings, self.batch_shardings, None),
        out_shardings=(self.state_shardings, parallel.replicated(self.mesh)), donate_argnums=0)
    self._eval_step_jit = jax.jit(
        self._eval_step, in_shardings=(self.state_shardings.params, self.batch_shardings, None, None),
        out_shardings=parallel.replicated(self.mesh))

  def train_step(self, state: TrainState, batch):
    """One optimizer step (jitted; `state` is donated): returns (state, metrics)."""
    leaf = jax.tree.leaves(state.params)[0]
    if isinstance(leaf, jax.Array) and leaf.is_deleted():
      raise ValueError("this TrainState was consumed (donated) by an earlier train_step; use the state it "
                       "returned: state, metrics = trainer.train_step(state, batch)")
    return self._train_step_jit(state, batch, self.frozen)

  def eval_step(self, params, batch, rng):
    """(sums, denominators) of the objective on one batch, deterministic."""
    return self._eval_step_jit(params, batch, rng, self.frozen)

  # --- state -------------------------------------------------------------------------------
  def _init(self, rng):
    return self.objective.init_params(rng)

  def _build_shardings(self):
    self.state_shardings, self.abstract_state = state_layout(self._init, self.tx, self.mesh)
    bs = parallel.batch_sharding(self.mesh)
    keys = ("input_ids", "segment_ids") + PACKED_KEYS * (self.config.data.packing == "packed")
    self.batch_shardings = {k: bs for k in keys}

  def init_state(self, seed: int | None = None) -> TrainState:
    """Parameters and optimizer state created directly in their shardings."""
    seed = self.config.seed if seed is None else seed

    def init(key, frozen):
      init_key, loop_key = jax.random.split(key)
      params = self.objective.initial_params(nn.meta.unbox(self._init(init_key)), frozen)
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=self.tx.init(params), rng=loop_key)

    return jax.jit(init, out_shardings=self.state_shardings)(jax.random.PRNGKey(seed), self.frozen)

  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))

  # --- steps -------------------------------------------------------------------------------
  def mask(self, rng, input_ids) -> masking.MaskedBatch:
    return masking.apply_masking(rng, input_ids, self.word_start_table, self.config.masking,
                                 vocab_size=self.vocab_size)

  def _prepare(self, rng, batch):
    return self.objective.prepare(rng, batch)  # packed rows' PACKED_KEYS pass through

  def _sums(self, params, mb, dropout_rng, deterministic, frozen=None):
    with parallel.activation_sharding(self.mesh):
      return self.objective.sums(params, mb, dropout_rng, deterministic, frozen)

  def _train_step(self, state: TrainState, batch, frozen=None):
    rng = jax.random.fold_in(state.rng, state.step)
    mask_rng, dropout_rng = jax.random.split(rng)
    prepared = self._prepare(mask_rng, batch)
    # Global counts over the whole batch, before micro-batching: each micro-batch's loss is
    # already divided by them, so summing micro-batch gradients gives the large-batch gradient.
    den = jax.lax.stop_gradient(self.objective.denominators(prepared))

    def loss_fn(params, mb, key):
      sums = self._sums(params, mb, key, deterministic=False, frozen=frozen)
      return self.objective.loss(sums, den), sums

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
    if self.penalty is not None:  # EWC: once per optimizer step, outside the micro-batch scan
      ewc_penalty, ewc_grads = jax.value_and_grad(self.penalty)(state.params)
      grads = jax.tree.map(jnp.add, grads, ewc_grads)
    grads = resilience.poison_at(grads, state.step, self._poisoned_steps)  # testing hook; no-op by default
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = self.objective.metrics(sums, den)
    metrics.update(grad_norm=optax.global_norm(grads), learning_rate=self.schedule(state.step))
    metrics.update(optimizer_metrics(opt_state))  # rates actually used, trust ratios, hypergradients
    if self.penalty is not None:
      metrics["ewc_penalty"] = ewc_penalty
    # Non-finite guard (resilience.py): a NaN/inf step leaves params and optimizer state as they
    # were; the step counter still advances, in lockstep with the data iterator.
    ok = resilience.step_is_finite(metrics["loss"], metrics["grad_norm"])
    params, opt_state = resilience.keep_if(ok, (params, opt_state), (state.params, state.opt_state))
    metrics["skipped"] = (~ok).astype(jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _eval_step(self, params, batch, rng, frozen=None):
    prepared = self._prepare(rng, batch)
    # No dropout; the key is for objectives that sample inside `sums` (ELECTRA's generator).
    return (self._sums(params, prepared, jax.random.fold_in(rng, 1), deterministic=True, frozen=frozen),
            self.objective.denominators(prepared))

  def evaluate(self, params, batches, seed: int | None = None, global_batch_size: int | None = None) -> dict:
    """Held-out metrics of the objective (MLM loss/accuracy/perplexity...) with a fixed RNG.

    `batches` are whole global batches, or with `global_batch_size` this process's rows of
    each (`pipeline.eval_batches(rows=parallel.batch_rows(mesh, global_batch_size))`).
    """
    key = jax.random.PRNGKey(self.config.seed if seed is None else seed)
    key = jax.random.fold_in(key, 0x5EED)  # distinct from every training step's key
    totals = None
    for i, batch in enumerate(batches):
      sums = self.eval_step(params, parallel.global_batch(batch, self.mesh, global_batch_size),
                            jax.random.fold_in(key, i))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
      raise ValueError("no held-out batches to evaluate")
    sums, den = jax.device_get(totals)
    result = self.objective.eval_metrics(sums, den)
    if self.unigram_nll is not None and self.has_unigram_baseline:
      result["eval/unigram_mlm_loss"] = self._unigram_loss(batches, key, global_batch_size)
    return result

  unigram_nll = None  # -log p(v) of the training rows' unigram model (metrics.unigram_neg_log_probs)

  @property
  def has_unigram_baseline(self) -> bool:
    """Whether the objective names its held-out MLM targets (`Objective.eval_targets`): MLM, its
    pair/distillation variants and MAPNet do; ELECTRA does not."""
    return type(self.objective).eval_targets is not pretraining.Objective.eval_targets

  def _unigram_loss(self, batches, key, global_batch_size: int | None = None) -> float:
    """The unigram model's loss on the same held-out masked targets as `evaluate` (same keys), with
    the same weights and denominator as the objective's eval/mlm_loss (`Objective.eval_targets`)."""
    def sums(batch, rng, nll):
      p = self._prepare(rng, batch)
      targets, weights = self.objective.eval_targets(p)
      # where(): ids the unigram model never predicts have nll inf; they only stand at weight 0.
      return (jnp.sum(jnp.where(weights > 0, weights * nll[targets], 0.0)),
              self.objective.denominators(p)["num_predictions"])
    if not hasattr(self, "_unigram_jit"):
      self._unigram_jit = jax.jit(sums)
    total = np.zeros(2)
    for i, batch in enumerate(batches):
      total += np.array(self._unigram_jit(parallel.global_batch(batch, self.mesh, global_batch_size),
                                          jax.random.fold_in(key, i),
                           self.unigram_nll))
    return float(total[0] / max(total[1], 1.0))


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrain as `config` says, resuming from `workdir` if it holds a checkpoint.

  Returns the last logged train metrics and the last evaluation.
  """
  from spanlm import workdir as workdir_lib
  from spanlm.data import pipeline, prefetch  # data is only needed by the loop

  configs.validate(config)
  t = config.train
  # Checks the config against the workdir before writing anything, prepares the data, then config.json.
  wd, dataset, tokenizer = workdir_lib.open_run(config, workdir)
  mesh = parallel.make_mesh(config.mesh)
  trainer = Trainer(config, tokenizer.vocab_size, tokenizer.word_start_table(), mesh)
  trainer.unigram_nll = unigram_neg_log_probs(dataset.train, tokenizer.vocab_size)
  logging.info("model: %s, %.2fM parameters; mesh %s; %d train / %d held-out rows of %d tokens",
               config.model.size, trainer.num_params() / 1e6, dict(mesh.shape),
               len(dataset.train), len(dataset.validation), t.seq_len)

  # Each process loads exactly the rows of each global batch that its devices hold.
  rows = parallel.batch_rows(mesh, t.batch_size)
  train_iter = pipeline.train_iterator(dataset.train, global_batch_size=t.batch_size, seed=config.seed,
                                       rows=rows, num_workers=config.data.num_workers,
                                       prefetch=config.data.prefetch)
  # Held-out rows are read batch by batch at each evaluation, nothing at start-up.
  eval_data = prefetch.Reiterable(lambda: pipeline.iter_eval_batches(
      dataset.validation, batch_size=t.batch_size, max_batches=t.eval_batches or None, rows=rows))
  checkpointer = wd.checkpointer(max_to_keep=t.keep_checkpoints)
  restored = _restore(checkpointer, trainer)  # newest intact one (falls back; converts the layer layout)
  if restored is None:
    state = trainer.init_state()
    if config.model.get("output_bias_init", "zeros") == "unigram":
      state = unigram_output_biases(state, trainer.unigram_nll)
    if config.get("ewc") and config.ewc.get("init_from_theta"):  # EWC task B continues from task A
      state = ewc.start_from_theta_star(trainer, state, config.ewc)
    start = 0
  else:
    start, state, data_state = restored
    train_iter.set_state(data_state["iterator"])
    trim_metrics(wd.root, start)  # rows the interrupted run logged after its last checkpoint
    logging.info("resumed from %s at step %d", checkpointer.directory, start)
  last = min(t.stop_at_step, t.num_steps) if t.stop_at_step else t.num_steps
  if start >= last:
    logging.info("run is complete: step %d of %d already done in %s (raise "
                 "config.train.num_steps/stop_at_step or use a new --workdir to train more)",
                 start, last, wd)
    checkpointer.close()
    return {"step": start, "complete": True}

  # The next global batch is read and put on device in a thread while the current step runs.
  train_iter = prefetch.DevicePrefetcher(train_iter, lambda local: parallel.global_batch(local, mesh, t.batch_size),
                                         depth=config.data.prefetch)
  writer = MetricsWriter(wd.root)
  tokens_per_step = t.batch_size * t.seq_len
  history, last_eval, last_train = [], {}, {}
  tick, tick_step = time.time(), start
  step = start
  # Skipped (NaN/inf) steps and loss spikes are counted on the host one step late, so the host
  # never waits for the step it just dispatched (see resilience.py).
  monitor = resilience.StepMonitor(t.max_nonfinite_steps, t.spike_window, t.spike_k)
  in_flight = None

  def observe(pending):
    if pending is not None:
      loss, skipped = jax.device_get((pending[1]["loss"], pending[1]["skipped"]))
      monitor.observe(pending[0], float(loss), bool(skipped))

  preempted = False
  guard = resilience.PreemptionGuard().__enter__()  # SIGTERM -> finish the step, save, exit 0
  try:
    for step in range(start + 1, last + 1):
      state, metrics = trainer.train_step(state, next(train_iter))
      if step == start + 1:
        train_iter.exclude_interval()  # the first step compiles: not a step time
      observe(in_flight)
      in_flight = (step, metrics)
      history.append(metrics)
      if step % t.log_every == 0 or step == last:
        observe(in_flight)
        in_flight = None
        # Means over the steps that were applied: a skipped step's NaN loss would hide the rest.
        means = {k: float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")
                 for k, v in jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history)).items()}
        means.update(monitor.metrics())
        history = []
        elapsed = time.time() - tick
        steps_per_sec = (step - tick_step) / max(elapsed, 1e-9)
        tick, tick_step = time.time(), step
        last_train = {f"train/{k}": v for k, v in means.items() if k != "learning_rate"}
        last_train.update(learning_rate=means["learning_rate"], steps_per_sec=steps_per_sec,
                          tokens_per_sec=steps_per_sec * tokens_per_step)
        # Time blocked on the next batch / time per step (0 = the input never stalled the loop).
        last_train["perf/input_wait_fraction"] = train_iter.take_wait_fraction()
        writer.write(step, last_train)
        logging.info("step %d/%d | %s | lr %.2e | %.2f steps/s | "
                     "%.0f tok/s | ETA %s", step, t.num_steps, trainer.objective.log_summary(means),
                     means["learning_rate"], steps_per_sec,
                     steps_per_sec * tokens_per_step,
                     _format_eta((t.num_steps - step) / max(steps_per_sec, 1e-9)))
      # Before eval: the grace period after a preemption signal is for the checkpoint.
      preempted = guard.reached(step)
      if ((t.eval_every and step % t.eval_every == 0) or step == last) and not preempted:
        last_eval = trainer.evaluate(state.params, eval_data, global_batch_size=t.batch_size)
        writer.write(step, last_eval)
        logging.info("eval step %d | held-out %s", step, _with_baseline(trainer.objective.eval_summary(last_eval),
                                                                        last_eval))
        train_iter.exclude_interval()  # evaluation time is not input wait's denominator
      if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == last or preempted:
        checkpointer.save(step, state, {"iterator": train_iter.get_state()})
        train_iter.exclude_interval()
      if preempted:
        logging.warning("preemption signal (%s): stopped after step %d with a checkpoint; rerun "
                        "the same command to continue", guard.signal_name or "sync point", step)
        break
    observe(in_flight)
  finally:
    guard.__exit__(None, None, None)
    train_iter.close()
    checkpointer.close()
    writer.close()
  if jax.process_index() == 0 and (png := plot_curves([wd.root], wd.root / "curves.png")):
    logging.info("curves: %s", png)
  logging.info("done: step %d, checkpoint in %s", step, checkpointer.directory)
  return {"step": step, **last_train, **last_eval, **({"preempted": True} if preempted else {})}


def _with_baseline(summary: str, result: dict) -> str:
  """Put the unigram baseline of the same held-out targets beside the held-out MLM loss."""
  if "eval/unigram_mlm_loss" not in result:
    return summary
  loss, base = result["eval/mlm_loss"], result["eval/unigram_mlm_loss"]
  first, _, rest = summary.partition(" | ")
  gap = 100 * (base - loss) / base
  return f"{first} (unigram baseline {base:.3f}: {abs(gap):.1f}% {'below' if gap >= 0 else 'above'}) | {rest}"


OUTPUT_BIASES = ("mlm_bias", "sbo_bias")


def unigram_output_biases(state, unigram_nll: np.ndarray):
  """`state` with every MLM/SBO decoder bias (`OUTPUT_BIASES`) set to log p(v) of the unigram model.

  A fresh model then starts at the unigram baseline instead of spending its first hundred steps
  learning word frequencies (the trick of initialising a classifier's bias to the log class
  priors). Ids the unigram model never predicts ([PAD]/[CLS]/[SEP], rows padding the vocabulary)
  get the least frequent id's log-probability, so their logits start low but finite.
  """
  log_p = -np.asarray(unigram_nll, np.float64)
  floor = log_p[np.isfinite(log_p)].min()
  found = []

  def set_bias(path, leaf):
    if getattr(path[-1], "key", None) not in OUTPUT_BIASES:
      return leaf
    found.append(path)
    if leaf.ndim != 1 or leaf.shape[0] < log_p.shape[0]:
      raise ValueError(f"output bias {jax.tree_util.keystr(path)} has shape {leaf.shape}, not one entry "
                       f"per id of the {log_p.shape[0]}-id vocabulary")
    value = np.full(leaf.shape, floor, np.float32)
    value[:log_p.shape[0]] = np.where(np.isfinite(log_p), log_p, floor)
    value = value.astype(leaf.dtype)  # each process builds the shards it holds (multi-host safe)
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: value[index])

  params = jax.tree_util.tree_map_with_path(set_bias, state.params)
  if not found:
    raise ValueError(f"model.output_bias_init=unigram, but this model has no output bias named one of "
                     f"{OUTPUT_BIASES}; use model.output_bias_init=zeros")
  return state.replace(params=params)


def _restore(checkpointer, trainer):
  """restore_latest, also of a checkpoint written with the other layer layout (scanned/unrolled)."""
  from spanlm.models.bert import convert_encoders

  scanned = trainer.model.cfg.scanned
  try:
    return checkpointer.restore_latest(trainer.abstract_state)
  except ValueError as mismatch:
    try:
      restored = checkpointer.restore_latest(convert_encoders(trainer.abstract_state, not scanned))
    except ValueError:
      raise mismatch from None
    if restored is None:
      raise mismatch from None
    step, state, data = restored
    logging.info("checkpoint step %d has the other layer layout: converted (scan_layers=%s)", step, scanned)
    return step, jax.device_put(convert_encoders(state, scanned), trainer.state_shardings), data

