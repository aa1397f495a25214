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
for tests). Outputs in the workdir: config.json, metrics.jsonl (train loss every
`log_every` steps, dev metrics at every evaluation), checkpoints/ (the
TrainState, the best params so far and the best dev metrics), and, once the
run is complete, results.json, the best params' predictions on
`task.predict_splits()` and `model/`, the best encoder in the converted layout
(usable by tools/embed.py and `tools/import_checkpoint.py --to=hf`).

A run never starts over and never destroys work. Rerunning the same command
continues from the checkpoint (same batches, same dropout: the epoch's row order
is a function of (seed, epoch), with group_by_length also of the rows' lengths,
and step t's key is fold_in(rng, t)), or, when results.json says the run is
complete, says so and returns without training. A config that differs from the
workdir's config.json (other than `RESUMABLE_CHANGES`) is refused before
anything is written. SIGTERM and SIGINT
(Ctrl-C) finish the step in flight, write a checkpoint and return.
"""

from __future__ import annotations

import copy
import json
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from spanlm import configs, parallel, resilience
from spanlm.metrics import MetricsWriter, trim_metrics
from spanlm.models.bert import BertConfig, config_for
from spanlm.optim import make_optimizer
from spanlm.optim.layer_decay import describe as describe_layer_decay
from spanlm.optim.layer_decay import scale_by_layer_decay
from spanlm.tasks.base import Features, Progress, Task, format_duration
from spanlm.train import TrainState, state_layout

# Fields that may differ between invocations of one run: they change neither the
# trained parameters nor the schedule.
RESUMABLE_CHANGES = ("train.stop_at_step", "train.log_every", "finetune.eval_batch_size")
# Fields added after runs were written: a config.json without one ran as this value says.
ADDED_FIELDS = {"finetune.group_by_length": False}


def finetune_config(task: str = "") -> ml_collections.ConfigDict:
  """base_config() plus the task, init checkpoint and epoch settings (BERT's fine-tuning defaults),
  and, given a task name, that task's own group (e.g. config.squad, declared in tasks/squad.py)."""
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
    c.finetune.length_buckets = 4  # pad each batch to the shortest of seq_len, seq_len/2, /4, ... (this
    #                                many lengths, >= 16) that holds its longest row (1 = always seq_len)
    c.finetune.group_by_length = False  # train on batches of rows of similar length (shuffled mega-batches
    #                                     of 50 batches sorted by length), so more batches fit a short bucket
    c.optimizer.layer_decay = 1.0  # layer-wise LR decay d (ELECTRA): lr * d^(L+2-depth), 1 = off
    c.optimizer.bias_correction = True  # adam/adamw: False = BERT's Adam (no bias correction)
  c.model.dropout_rate = 0.1
  c.optimizer.learning_rate = 2e-5
  c.optimizer.weight_decay = 0.01
  c.optimizer.eps = 1e-6
  c.train.batch_size = 32
  c.train.seq_len = 128
  c.train.log_every = 50
  c.train.keep_checkpoints = 1
  c.schedule.name = "linear"
  if task:
    from spanlm import tasks
    c.task.name = task
    tasks.extend_config(c, task)
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
  if not isinstance(f.get("length_buckets", 1), int) or f.get("length_buckets", 1) < 1:
    fail(f"config.finetune.length_buckets={f.get('length_buckets')!r} must be a positive integer")
  if not isinstance(f.get("group_by_length", False), bool):
    fail(f"config.finetune.group_by_length={f.get('group_by_length')!r} must be True or False")
  if f.get("group_by_length", False) and f.get("length_buckets", 1) == 1:
    fail("config.finetune.group_by_length=True needs length_buckets > 1 (with one bucket every batch is "
         "padded to seq_len, so grouping gains nothing); set length_buckets=4 or group_by_length=False")
  if config.train.seq_len > config.model.max_position_embeddings:
    fail(f"config.train.seq_len={config.train.seq_len} exceeds max_position_embeddings="
         f"{config.model.max_position_embeddings}")
  t = config.train
  if not isinstance(t.grad_accum_steps, int) or t.grad_accum_steps < 1 or t.batch_size % t.grad_accum_steps:
    fail(f"config.train.batch_size={t.batch_size} must be divisible by grad_accum_steps={t.grad_accum_steps}")
  if not isinstance(t.stop_at_step, int) or t.stop_at_step < 0:
    fail(f"config.train.stop_at_step={t.stop_at_step!r} must be a non-negative integer")
  d = config.optimizer.get("layer_decay", 1.0)
  if not 0.0 < d <= 1.0:
    fail(f"config.optimizer.layer_decay={d} must be in (0, 1] (1 = off; ELECTRA uses 0.8 for Base)")
  from spanlm import tasks
  tasks.validate_config(config)
  if f.get("group_by_length", False) and not tasks.get_task(config.task.name, config).length_keys:
    fail(f"config.finetune.group_by_length=True, but task {config.task.name!r} has no length_keys (its "
         f"batches are always padded to seq_len); set group_by_length=False")


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
  from spanlm import convert, paths
  from spanlm import workdir as workdir_lib
  paths.check_bucket(path)  # a gs:// bucket that cannot be reached: one line
  wd = workdir_lib.Workdir(path)
  if wd.has_checkpoints():  # a pretraining workdir, local or gs://
    return _load_pretraining_workdir(path, config, common)
  if not wd.is_dir():
    raise FileNotFoundError(f"config.init_checkpoint={path!r} is not a directory; give a converted "
                            f"checkpoint (tools/import_checkpoint.py --out=DIR) or a pretraining workdir")
  if convert.is_converted(path):
    cfg, params, tok = convert.load_converted(path, tokenizer=config.data.tokenizer or None)
    cfg = convert.with_overrides(cfg, **common)
    return cfg, params, tok
  raise FileNotFoundError(f"config.init_checkpoint={path!r} holds neither spanlm_model.json (a converted "
                          f"checkpoint) nor checkpoints/ (a pretraining workdir)")


def _load_pretraining_workdir(workdir, config, common):
  """The newest intact pretraining TrainState's params['encoder'] and the run's own config and tokenizer."""
  from spanlm import train, workdir as workdir_lib
  from spanlm.data import wordpiece

  pre, tok_path, step, params = workdir_lib.load_pretrained(workdir)
  tok = wordpiece.load_tokenizer(config.data.tokenizer or tok_path)
  model = train.build_model(pre, tok.vocab_size)
  params = jax.tree.map(np.asarray, params["encoder"])
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
def bucket_lengths(seq_len: int, n: int) -> list[int]:
  """The padded lengths a batch may take: seq_len, seq_len/2, ... (n of them, rounded up to 8, >= 16)."""
  out = {seq_len}
  for k in range(1, n):
    out.add(max(16, -(-(seq_len >> k) // 8) * 8))
  return sorted(x for x in out if x <= seq_len)


class Finetuner:
  """Compiled train/eval steps for `task` over an encoder; usable from a notebook or test.

  The state is `spanlm.train.TrainState`, laid out by `train.state_layout`, as in pretraining.
  """

  def __init__(self, config, task: Task, encoder_cfg: BertConfig, example: dict[str, np.ndarray],
               num_steps: int, mesh=None):
    self.config, self.task = config, task
    self.mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    self.model = task.build_model(encoder_cfg)
    self.num_steps = num_steps
    cfg = copy.deepcopy(config)
    if config.finetune.warmup_fraction >= 0:
      cfg.schedule.warmup_steps = int(round(config.finetune.warmup_fraction * num_steps))
    self.tx, self.schedule = make_optimizer(cfg, num_steps, num_layers=encoder_cfg.num_layers)
    custom = task.optimizer(cfg, num_steps)
    decay = float(config.optimizer.get("layer_decay", 1.0))
    if custom is not None:
      self.tx = custom if decay == 1.0 else optax.chain(custom, scale_by_layer_decay(encoder_cfg.num_layers, decay))
      # The logged learning rate: the task's own schedule when it has one (BERTSUM: the encoder's).
      self.schedule = getattr(task, "schedule", None) or self.schedule
    self.accum = int(config.train.get("grad_accum_steps", 1) or 1)
    self.dp = parallel.data_parallel_size(self.mesh)
    for name, size in (("train.batch_size / train.grad_accum_steps", config.train.batch_size // self.accum),
                       ("finetune.eval_batch_size", config.finetune.eval_batch_size)):
      if size % self.dp:
        raise ValueError(f"config.{name}={size} is not divisible by the {self.dp} data-parallel devices")
    dummy = {k: jnp.zeros((1,) + v.shape[1:], v.dtype) for k, v in example.items()}
    dummy["example_mask"] = jnp.ones((1,), jnp.float32)
    self._dummy = dummy
    self.state_shardings, self.abstract_state = state_layout(self._init, self.tx, self.mesh)
    self.param_shardings = self.state_shardings.params
    if decay != 1.0:
      logging.info("layer-wise LR decay %g: %s", decay,
                   describe_layer_decay(self.abstract_state.params, encoder_cfg.num_layers, decay))
    seq_len = int(config.train.seq_len)
    n_buckets = int(config.finetune.get("length_buckets", 1))
    self.buckets = bucket_lengths(seq_len, n_buckets) if task.length_keys else [seq_len]
    bs = parallel.batch_sharding(self.mesh)
    rep = parallel.replicated(self.mesh)
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, bs),
                              out_shardings=(self.state_shardings, rep), donate_argnums=0)
    self.eval_step = jax.jit(self._eval_step, in_shardings=(self.param_shardings, bs), out_shardings=bs)

  def _init(self, rng):
    return self.model.init({"params": rng, "dropout": rng}, self._dummy, deterministic=True)["params"]

  def init_state(self, seed: int, pretrained=None) -> TrainState:
    def init(key):
      init_key, loop_key = jax.random.split(key)
      params = nn.meta.unbox(self._init(init_key))
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, rng=loop_key)

    state = jax.jit(init, out_shardings=self.state_shardings.replace(opt_state=None))(jax.random.PRNGKey(seed))
    params = state.params
    if pretrained is not None:
      params = jax.device_put(merge_encoder(jax.device_get(params), pretrained), self.param_shardings)
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state)

  def fit(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch cut to the shortest bucket length that holds its longest row (task.length_keys)."""
    if len(self.buckets) == 1:
      return batch
    length = bucket_for(self.buckets, int(row_lengths(batch).max()))
    if length == self.buckets[-1]:
      return batch
    return {k: (v[:, :length] if k in self.task.length_keys else v) for k, v in batch.items()}

  def _train_step(self, state, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def total_fn(params, mb, key):
      out = self.model.apply({"params": params}, mb, deterministic=False, rngs={"dropout": key})
      total, count = self.task.loss(out, mb)
      return total, (total, count)

    grad_fn = jax.grad(total_fn, has_aux=True)
    if self.accum == 1:
      grads, (total, count) = grad_fn(state.params, batch, rng)
    else:
      # The task's loss is a sum over examples and a count, so summing the micro-batches'
      # gradients of the sum and dividing once by the global count is the large-batch
      # gradient. Micro-batch j takes rows j, j+A, ...: each device keeps its own rows.
      a = self.accum
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, inputs):
        i, mb = inputs
        g, aux = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, aux)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), rng))
      (grads, (total, count)), _ = jax.lax.scan(body, zeros, (jnp.arange(a), micro))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=total / denom, grad_norm=optax.global_norm(grads),
                   learning_rate=self.schedule(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _eval_step(self, params, batch):
    return self.model.apply({"params": params}, batch, deterministic=True)

  def outputs(self, params, features: Features, name: str = "") -> dict[str, np.ndarray]:
    """Model outputs for every row of `features` (numpy, padding rows removed).

    With length buckets, rows are run in order of length (so each batch is padded to
    its own bucket) and put back in their order. A progress line (rows/s, ETA) is logged
    every ~10 s when `name` is given.
    """
    b = self.config.finetune.eval_batch_size
    n = len(features)
    order = np.arange(n)
    if len(self.buckets) > 1 and "attention_mask" in features.arrays:
      order = np.argsort(-row_lengths(features.arrays), kind="stable")
    progress = Progress(f"{name}: predicting", n, "rows") if name else None
    chunks = []
    for start in range(0, n, b):
      batch = self.fit(_rows(features.arrays, order[start:min(start + b, n)], b))
      out = self.eval_step(params, parallel.global_batch(batch, self.mesh))
      chunks.append(jax.tree.map(np.asarray, _gather(out)))
      if progress:
        progress.update(min(start + b, n))
    if progress:
      progress.done()
    if not chunks:
      return {}
    ordered = jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *chunks)
    inverse = np.empty(n, np.int64)
    inverse[order] = np.arange(n)
    return jax.tree.map(lambda x: x[inverse], ordered)


def row_lengths(arrays: dict[str, np.ndarray]) -> np.ndarray:
  """Non-pad tokens per row (the attention mask's sum): what length buckets and grouping go by."""
  return np.asarray(arrays["attention_mask"]).sum(axis=1)


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


# --- the run directory ---------------------------------------------------------------------------
def _flat(tree, prefix="") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(old: dict, new: dict) -> list[str]:
  """'key: old -> new' for every field that differs, except RESUMABLE_CHANGES."""
  a, b = {**ADDED_FIELDS, **_flat(old)}, {**ADDED_FIELDS, **_flat(new)}
  return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES]


def check_workdir(config, workdir):
  """The run's Workdir (local or gs://), after refusing a file and a workdir of a different run
  (nothing is written)."""
  from spanlm import paths
  from spanlm.workdir import Workdir
  paths.check_bucket(workdir)
  wd = Workdir(workdir)
  if wd.exists() and not wd.is_dir():
    raise ValueError(f"--workdir={wd} is a file, not a directory; give a directory (it is created "
                     f"if missing)")
  if wd.has_config():
    try:
      old = json.loads(wd.config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{wd.config_file} cannot be read ({e}); use a new --workdir") from None
    changes = config_changes(old, json.loads(config.to_json_best_effort()))
    if changes:
      shown = "; ".join(changes[:8]) + (f"; ... ({len(changes)} fields)" if len(changes) > 8 else "")
      raise ValueError(f"--workdir={wd} holds a run with a different config ({shown}). Rerun with "
                       f"the same config to continue it, or use a new --workdir; nothing was changed")
  elif wd.has_checkpoints():
    raise ValueError(f"--workdir={wd} has checkpoints/ but no config.json, so it is not a fine-tuning "
                     f"run this command can continue; use a new --workdir")
  return wd


# --- the loop ------------------------------------------------------------------------------------
def _order(seed: int, epoch: int, n: int, batch: int) -> np.ndarray:
  """The row order of `epoch`: a function of (seed, epoch) only, so a resumed run sees the same batches."""
  order = np.random.default_rng([seed, epoch]).permutation(n)
  return np.resize(order, batch) if n < batch else order  # fewer rows than a batch: repeat them


MEGA_BATCH = 50  # group_by_length sorts runs of this many batches by length


def _grouped_order(seed: int, epoch: int, lengths: np.ndarray, batch: int,
                   mega: int = MEGA_BATCH) -> np.ndarray:
  """The row order of `epoch` with finetune.group_by_length: rows of similar length share a batch.

  A function of (seed, epoch, lengths) only, so a resumed run sees the same batches. It rearranges
  `_order`'s rows: the rows one epoch trains on (its first steps * batch) are cut into runs of `mega`
  batches, each run sorted by length (longest first) and cut into batches; the batches are shuffled
  and the one with the longest row goes first, so an out-of-memory shows at step 1. The rows left
  over after the last full batch stay at the end, so an epoch trains on the same rows as without
  grouping.
  """
  lengths = np.asarray(lengths)
  order = _order(seed, epoch, len(lengths), batch)
  used = (len(order) // batch) * batch
  batches = []
  for start in range(0, used, mega * batch):
    run = order[start:min(start + mega * batch, used)]
    run = run[np.argsort(-lengths[run], kind="stable")]
    batches += [run[i:i + batch] for i in range(0, len(run), batch)]
  perm = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
  batches = [batches[i] for i in perm]
  first = int(np.argmax([lengths[rows].max() for rows in batches]))
  batches[0], batches[first] = batches[first], batches[0]
  return np.concatenate(batches + [order[used:]])


def bucket_for(buckets: list[int], longest: int) -> int:
  """The shortest of `buckets` (ascending) that holds a row of `longest` tokens."""
  return next(b for b in buckets if b >= longest)


def _bucket_shares(buckets, order, lengths, batch: int, steps: int) -> dict[int, float]:
  """Bucket length -> share of the first `steps` batches of `order` that it is the bucket of."""
  counts = dict.fromkeys(buckets, 0)
  for pos in range(steps):
    counts[bucket_for(buckets, int(lengths[order[pos * batch:(pos + 1) * batch]].max()))] += 1
  return {k: v / steps for k, v in counts.items()}


def _describe_shares(shares: dict[int, float]) -> str:
  return (", ".join(f"{k}: {v:.0%}" for k, v in shares.items())
          + f", mean padded length {sum(k * v for k, v in shares.items()):.1f}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tune and evaluate as `config` says (resuming from `workdir`); returns the results."""
  from spanlm.tasks import get_task

  validate(config)
  if jax.process_count() > 1:
    raise NotImplementedError("fine-tuning runs on one process (any number of local devices); "
                              "multi-host fine-tuning is not implemented")
  wd = check_workdir(config, workdir)
  results_path = wd.root / "results.json"
  task = get_task(config.task.name, config)
  encoder_cfg, pretrained, tokenizer = load_encoder(config)
  seq_len = config.train.seq_len
  train_data = _cap(task.load("train", tokenizer, seq_len), config.task.max_train_examples)
  train_data.log_report(f"{task.name}/train")
  if len(train_data) == 0:
    raise ValueError(f"task {task.name}: no usable training rows in {config.task.data_dir!r} (see the log)")
  b = config.train.batch_size
  steps_per_epoch = max(len(train_data) // b, 1)
  num_steps = steps_per_epoch * max(config.finetune.num_epochs, 1)
  if config.finetune.max_steps:
    num_steps = min(num_steps, config.finetune.max_steps) if config.finetune.num_epochs > 0 \
        else config.finetune.max_steps
  tuner = Finetuner(config, task, encoder_cfg, train_data.arrays, num_steps)
  wd.check_writable()  # creates it; an unwritable folder or bucket is one line, before any training
  checkpointer = wd.checkpointer(max_to_keep=1, async_save=False)
  restored = checkpointer.restore_latest({"train": tuner.abstract_state, "best": tuner.abstract_state.params})
  start, best, best_step, best_params = 0, None, 0, None
  if restored is not None:
    start, tree, meta = restored
    state, best_params = tree["train"], tree["best"]
    best, best_step = meta.get("best"), int(meta.get("best_step", 0))
    if start >= num_steps and results_path.exists():
      checkpointer.close()
      out = json.loads(results_path.read_text())
      logging.info("run is complete: %d of %d steps done in %s, results in %s (use a new --workdir to "
                   "train again)", start, num_steps, wd, results_path)
      return {**out, "complete": True}
    logging.info("resumed from %s at step %d of %d", checkpointer.directory, start, num_steps)
  else:
    state = tuner.init_state(config.seed, pretrained)
  del pretrained
  eval_data = cal_data = None
  if config.task.eval_split:
    eval_data = _cap(task.load(config.task.eval_split, tokenizer, seq_len), config.task.max_eval_examples)
    eval_data.log_report(f"{task.name}/{config.task.eval_split}")
    if task.calibration_split():
      cal_data = task.load(task.calibration_split(), tokenizer, seq_len)
      cal_data.log_report(f"{task.name}/{task.calibration_split()}")
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("task %s: %.2fM parameters, %d train rows, %d steps (%d per epoch, batch %d x %d tokens%s%s), "
               "mesh %s", task.name, n_params / 1e6, len(train_data), num_steps, steps_per_epoch, b,
               seq_len, f", {tuner.accum} micro-batches" if tuner.accum > 1 else "",
               f", length buckets {tuner.buckets}" if len(tuner.buckets) > 1 else "", dict(tuner.mesh.shape))
  group = bool(config.finetune.get("group_by_length", False))
  lengths = row_lengths(train_data.arrays) if group else None
  order_epoch, order = None, None
  if group:  # this epoch's batches per bucket, grouped and as random batches would be
    order_epoch = start // steps_per_epoch
    order = _grouped_order(config.seed, order_epoch, lengths, b)  # the loop's first epoch uses it
    grouped = _bucket_shares(tuner.buckets, order, lengths, b, steps_per_epoch)
    plain = _bucket_shares(tuner.buckets, _order(config.seed, order_epoch, len(train_data), b), lengths, b,
                           steps_per_epoch)
    logging.info("group_by_length: training batches per bucket %s (random batches: %s)",
                 _describe_shares(grouped), _describe_shares(plain))
  wd.config_file.write_text(config.to_json_best_effort(indent=2))
  trim_metrics(wd.root, start)

  t = config.train
  last = min(t.stop_at_step, num_steps) if t.stop_at_step else num_steps
  writer = MetricsWriter(wd.root)
  eval_points = {int(round(steps_per_epoch * (i + 1) / config.finetune.evals_per_epoch))
                 for i in range(config.finetune.evals_per_epoch)}
  history, tick, tick_step, step, preempted = [], time.time(), start, start, False

  def save(step):
    tree = {"train": state, "best": best_params if best_params is not None else state.params}
    checkpointer.save(step, tree, {"step": step, "best": best, "best_step": best_step})

  guard = resilience.PreemptionGuard(signals=(signal.SIGTERM, signal.SIGINT)).__enter__()
  try:
    for step in range(start + 1, last + 1):
      epoch, pos = divmod(step - 1, steps_per_epoch)
      if epoch != order_epoch:
        order_epoch = epoch
        order = _grouped_order(config.seed, epoch, lengths, b) if group else \
            _order(config.seed, epoch, len(train_data), b)
      batch = tuner.fit(_rows(train_data.arrays, order[pos * b:(pos + 1) * b], b))
      state, metrics = tuner.train_step(state, parallel.global_batch(batch, tuner.mesh))
      history.append(metrics)
      if step % t.log_every == 0 or step == num_steps:
        means = {k: float(np.mean(v)) for k, v in jax.device_get(
            jax.tree.map(lambda *xs: jnp.stack(xs), *history)).items()}
        history = []
        rate = (step - tick_step) / max(time.time() - tick, 1e-9)
        tick, tick_step = time.time(), step
        writer.write(step, {"train/loss": means["loss"], "train/grad_norm": means["grad_norm"],
                            "learning_rate": means["learning_rate"], "epoch": step / steps_per_epoch})
        logging.info("step %d/%d | epoch %.2f | loss %.4f | lr %.2e | %.2f steps/s | ETA %s", step,
                     num_steps, step / steps_per_epoch, means["loss"], means["learning_rate"], rate,
                     format_duration((num_steps - step) / max(rate, 1e-9)))
      evaluated = False
      if eval_data is not None and (pos + 1 in eval_points or step == num_steps):
        result = evaluate(tuner, state.params, eval_data, name=f"{task.name}/{config.task.eval_split}",
                          calibration=cal_data)
        evaluated = True
        writer.write(step, {f"eval/{k}": v for k, v in result.items()})
        logging.info("eval step %d (epoch %.2f) | %s", step, step / steps_per_epoch,
                     " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
        score = result[task.metric]
        if best is None or (score > best[task.metric] if task.higher_is_better else score < best[task.metric]):
          best, best_step = result, step
          best_params = jax.tree.map(jnp.copy, state.params)  # `state` is donated to the next step
      preempted = guard.reached(step)
      if evaluated or preempted or step == last or (t.checkpoint_every and step % t.checkpoint_every == 0):
        save(step)
      if preempted:
        logging.warning("%s: stopped after step %d with a checkpoint; rerun the same command to continue",
                        guard.signal_name or "preemption", step)
        break
  finally:
    guard.__exit__(None, None, None)
    writer.close()
  if step < num_steps:
    checkpointer.close()
    how = "preempted" if preempted else "stopped_at_step"
    logging.info("%s at step %d of %d; rerun the same command to continue", how, step, num_steps)
    return {"task": task.name, "step": step, "steps": num_steps, how: True}
  checkpointer.close()

  if best_params is None or eval_data is None:  # no dev split: the final params
    best_params, best_step = state.params, num_steps
  from spanlm import convert
  convert.save_converted(wd.root / "model", encoder_cfg, jax.device_get(best_params["encoder"]), tokenizer)
  out = {"task": task.name, "steps": num_steps, "best_step": best_step}
  if best is not None:
    out.update({f"best/{k}": v for k, v in best.items()})
  out["prediction_files"] = []
  for split in task.predict_splits():
    out["prediction_files"] += _predict(tuner, task, best_params, tokenizer, seq_len, wd.root, split, best)
  out["complete"] = True
  from spanlm import paths
  paths.write_text_atomic(results_path, json.dumps(out, indent=2))  # last: marks the run complete
  logging.info("done: best %s at step %d; results in %s", best, best_step, wd)
  return out


def evaluate(tuner: Finetuner, params, features: Features, name: str = "",
             calibration: Features | None = None) -> dict[str, float]:
  """The task's metrics of `params` on `features` (with `calibration`, the task's calibration split,
  predicted too and handed to `task.evaluate`)."""
  task = tuner.task
  predictions = task.predict(tuner.outputs(params, features, name=name), features)
  cal = None
  if calibration is not None:
    cal = (task.predict(tuner.outputs(params, calibration, name=f"{name} calibration"), calibration),
           calibration)
  return {k: float(v) for k, v in task.evaluate(predictions, features, cal).items()}


def _predict(tuner, task, params, tokenizer, seq_len, workdir, split, best) -> list[str]:
  """Write the predictions of `params` on `split` (with `best`, the dev metrics of the epoch they
  come from: SQuAD v2.0's null threshold belongs to it)."""
  try:
    features = task.load(split, tokenizer, seq_len)
  except FileNotFoundError as e:
    logging.warning("no %s predictions: %s", split, e)
    return []
  features.log_report(f"{task.name}/{split}")
  params = jax.device_put(params, tuner.param_shardings)
  predictions = task.predict(tuner.outputs(params, features, name=f"{task.name}/{split}"), features)
  written = task.write_predictions(predictions, features, str(workdir / task.prediction_dir(split)), best or {})
  for p in written:
    logging.info("wrote %s predictions to %s", split, p)
  return written
