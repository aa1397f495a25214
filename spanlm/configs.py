"""The config every experiment starts from, and its validation.

Experiment files (`experiments/*.py`) call `base_config()` and change what their
paper changes. Every field has a comment giving its meaning and unit. The
returned ConfigDict is locked: assigning a key that does not exist (from an
experiment file or `--config.a.b=v`) is an error rather than a silent no-op.
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections
from ml_collections import config_dict

from spanlm.models.bert import PRESETS


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, masking, dropout and the data order

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000  # optimizer steps
  c.train.batch_size = 32  # global batch, sequences per optimizer step
  c.train.seq_len = 128  # tokens per sequence, [CLS] and [SEP] included
  c.train.grad_accum_steps = 1  # micro-batches per step (batch_size divisible by it)
  c.train.log_every = 50  # steps between log lines / metrics.jsonl rows
  c.train.eval_every = 250  # steps between held-out evaluations (0 = only at the end)
  c.train.eval_batches = 10  # held-out batches per evaluation (0 = the whole split)
  c.train.checkpoint_every = 500  # steps between checkpoints (the last step is always saved)
  c.train.keep_checkpoints = 3  # checkpoints kept on disk
  c.train.stop_at_step = 0  # end this invocation at this step, checkpointed (0 = num_steps);
  #                           for time-boxed jobs: the schedule still spans num_steps
  c.train.max_nonfinite_steps = 10  # stop after this many consecutive NaN/inf steps (0 = never)
  c.train.spike_window = 100  # steps in the loss-spike window (0 = no spike detection)
  c.train.spike_k = 6.0  # a loss above window mean + spike_k * std is logged as a spike
  c.train.inject_nonfinite_steps = ""  # testing only: "3,7" poisons those steps' gradients with NaN

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size (-1 = all remaining devices)
  c.mesh.fsdp = 1  # data-parallel axis that also shards parameters/optimizer state
  c.mesh.model = 1  # tensor-parallel axis (heads, FFN, vocabulary)

  c.data = ml_collections.ConfigDict()
  c.data.corpus = ""  # a .txt/.txt.gz file, a folder of them, a glob, or a prepared dataset dir; "" = bundled sample
  c.data.skip_bad_files = False  # skip unreadable corpus files (empty, binary, not UTF-8) with a warning
  c.data.tokenizer = ""  # SentencePiece .model; "" = the sample's, or trained on the corpus
  c.data.vocab_size = 8000  # vocabulary size when a tokenizer has to be trained
  c.data.validation_fraction = 0.01  # held-out share of each document's rows
  c.data.num_workers = 0  # grain worker processes reading and batching rows (0 = in the main process)
  c.data.prefetch = 2  # batches read ahead per worker and staged on device ahead of the step
  c.data.packing = "document"  # rows: document (never cross documents) | full_sentences
  #   (RoBERTa: fill across documents, [SEP] between) | packed (short documents share a row,
  #   attention blocked between them, positions restart); see spanlm/data/prepare.py

  c.model = ml_collections.ConfigDict()
  c.model.size = "base"  # preset: tiny | mini | small | medium | base | large
  c.model.num_layers = config_dict.placeholder(int)  # overrides of the preset (None = preset)
  c.model.hidden_size = config_dict.placeholder(int)
  c.model.num_heads = config_dict.placeholder(int)
  c.model.intermediate_size = config_dict.placeholder(int)
  c.model.max_position_embeddings = 512  # longest sequence the model accepts
  c.model.dropout_rate = 0.1
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  c.model.attention_impl = "auto"  # auto (cuDNN on GPU in bf16, splash on TPU, else XLA) | xla | cudnn | splash
  c.model.scan_layers = config_dict.placeholder(bool)  # nn.scan over layers (None = from 6 layers up)
  c.model.vocab_multiple = 128  # embedding rows padded to a multiple of this (sharding, MXU)
  c.model.embedding_size = config_dict.placeholder(int)  # ALBERT factorized embeddings E (None = hidden_size)
  c.model.share_layers = "none"  # ALBERT cross-layer sharing: none | all | attention | ffn
  c.model.remat = "none"  # per-layer activation checkpointing: none | full | dots_saveable | dots_with_no_batch_dims_saveable
  c.model.head_mask = ""  # attention heads switched off, "layer:head,..." 0-based, e.g. "0:3,5:1" (head ablation)
  # Output biases of the MLM/SBO decoders at the start of a fresh run: zeros (BERT's reference) or
  # log p(v) of the training rows' unigram model, so the first step already predicts word frequencies.
  c.model.output_bias_init = "zeros"  # zeros | unigram

  c.masking = ml_collections.ConfigDict()
  c.masking.scheme = "token"  # token | whole_word | span | ngram
  c.masking.rate = 0.15  # share of maskable tokens predicted
  c.masking.mask_prob = 0.8  # of predicted units: replaced by [MASK]
  c.masking.random_prob = 0.1  # ... by a random token (the rest kept)
  c.masking.geometric_p = 0.2  # span length in words ~ Geo(p), truncated (span only)
  c.masking.max_span = 10  # longest span in words (span only)
  c.masking.max_ngram = 3  # ngram only (ALBERT): n-grams of n <= max_ngram whole words, p(n) ∝ 1/n
  c.masking.replacement = ""  # random replacements: uniform (BERT, ALBERT) | unigram (SpanBERT: the
  #                            token stream); "" = the scheme's paper's (span: unigram, others: uniform)
  c.masking.max_predictions = 0  # cap on predicted tokens per row (ALBERT's max_predictions_per_seq=20); 0 = none
  c.masking.smoothing = 0.0  # token only: choose tokens with p ∝ count^-smoothing (DistilBERT's mlm_smoothing 0.7)

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "mlm"  # pretraining objective (spanlm/objectives/base.py OBJECTIVES): mlm | mlm_nsp | mlm_sop | ...
  c.objective.pair_weight = 1.0  # mlm_nsp/mlm_sop: L = L_MLM (per token) + pair_weight * L_pair (per row)
  c.objective.sbo = False  # add SpanBERT's span boundary objective
  c.objective.sbo_weight = 1.0  # L = L_MLM + sbo_weight * L_SBO
  c.objective.sbo_max_targets = 15  # SBO targets per span: its first N tokens (SpanBERT: 15)
  c.objective.sbo_position_size = 200  # width of SBO's target-position embeddings (SpanBERT: 200)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | adam | lamb | lars | sgd | sgd_hd | adam_hd (see docs/optimizers.md)
  c.optimizer.learning_rate = 1e-4  # peak learning rate
  c.optimizer.weight_decay = 0.01  # decoupled; not on LayerNorm or biases
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.optimizer.bias_correction = True  # adam/adamw: Adam's bias correction (False: BERT's and ELECTRA's code)
  c.optimizer.grad_clip = 1.0  # global-norm clipping (0 = off)
  c.optimizer.momentum = 0.9  # sgd, lars, sgd_hd (Nesterov, as SGDN-HD)
  c.optimizer.trust_coefficient = 0.001  # lars: eta in eta ||w|| / (||g|| + wd ||w||)
  c.optimizer.trust_min_norm = 0.0  # lamb: phi clips ||w|| to [min, max] in the trust ratio
  c.optimizer.trust_max_norm = 0.0  # lamb: upper bound of phi (0 = none)
  c.optimizer.hyper_lr = 0.0  # sgd_hd/adam_hd: the rate's own rate beta (0 = paper's: 1e-3 / 1e-7)
  c.optimizer.hd_per_tensor = False  # sgd_hd/adam_hd: one adapted rate per parameter tensor
  c.optimizer.groups = ()  # parameter groups: tuple of {"pattern": regex over 'a/b/kernel',
  #                          "label": name, <optimizer key>: override}; first match wins

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "warmup_linear"  # warmup_linear | warmup_poly | warmup_cosine | triangular |
  #   triangular2 | exp_range | onecycle | constant ('linear', 'cosine' = aliases); peak = optimizer LR
  c.schedule.warmup_steps = 100  # linear warmup from 0 to the peak, in steps (warmup_* and constant)
  c.schedule.min_learning_rate = 0.0  # decay floor; base LR of the cyclical schedules and onecycle
  c.schedule.power = 1.0  # warmup_poly: (1 - progress)^power
  c.schedule.cycle_steps = 0  # cyclical: half-cycle "step size" in steps (0 = num_steps // 2)
  c.schedule.gamma = 0.9999  # exp_range: amplitude times gamma^step
  c.schedule.pct_start = 0.45  # onecycle: share of num_steps spent rising (and again falling)
  c.schedule.final_div_factor = 100.0  # onecycle: ends at min_learning_rate / this

  c.ewc = ml_collections.ConfigDict()  # elastic weight consolidation (spanlm/optim/ewc.py)
  c.ewc.fisher_path = ""  # .npz of tools/compute_fisher.py (Fisher + task-A params); "" = off
  c.ewc.lambda_ = 0.0  # loss += lambda_/2 * sum_i F_i (theta_i - theta*_A,i)^2 (0 = off; the
  #                     trailing _ because --config.ewc.lambda cannot be parsed: a Python keyword)
  c.ewc.init_from_theta = False  # a fresh run starts from the task-A params stored in fisher_path

  c.lock()
  return c


def load(spec: str) -> ml_collections.ConfigDict:
  """Load `path/to/experiment.py[:preset]` as --config would (for notebooks and tools)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"experiment file {path!r} not found; relative paths are looked up from the current directory "
        f"{os.getcwd()}: pass an absolute path, or run from the repository root "
        f"(e.g. experiments/span_bert.py:tiny)")
  module_spec = importlib.util.spec_from_file_location(f"spanlm_experiment_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def with_preset(config: ml_collections.ConfigDict, arg: str | None, presets: dict) -> ml_collections.ConfigDict:
  """Apply the preset named after ':' in --config=file.py:NAME."""
  if arg:
    if arg not in presets:
      raise ValueError(f"unknown preset {arg!r}; choose one of {sorted(presets)}")
    presets[arg](config)
  return config


def cpu_tiny(c: ml_collections.ConfigDict) -> None:
  """A BERT-tiny run that trains in about two minutes on two CPU cores."""
  c.model.size = "tiny"
  c.model.dtype = "float32"  # CPUs have no fast bf16 matmul: tiny runs stay fp32
  c.model.dropout_rate = 0.0  # a short run underfits; dropout only slows it down
  c.train.num_steps = 500
  c.train.batch_size = 32
  c.train.seq_len = 128
  c.train.log_every = 50
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.checkpoint_every = 250
  c.optimizer.learning_rate = 1e-3  # small models take (and need) a larger step
  c.schedule.warmup_steps = 50


_CHOICES = {
    ("model", "size"): tuple(PRESETS),
    ("model", "dtype"): ("float32", "bfloat16"),
    ("model", "attention_impl"): ("", "auto", "xla", "cudnn", "splash"),
    ("model", "remat"): ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"),
    ("data", "packing"): ("document", "full_sentences", "packed"),
    ("masking", "scheme"): ("token", "whole_word", "span", "ngram"),
    ("model", "share_layers"): ("none", "all", "attention", "ffn"),
    ("model", "output_bias_init"): ("zeros", "unigram"),
}


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ValueError naming the field and what to do, before anything is built."""
  def fail(msg):
    raise ValueError(f"invalid config: {msg}")

  for (group, key), choices in _CHOICES.items():
    value = config[group].get(key, choices[0])  # a config.json from before the field existed
    if value not in choices:
      fail(f"config.{group}.{key}={value!r}; choose one of {choices}")
  t = config.train
  for key in ("num_steps", "batch_size", "seq_len", "grad_accum_steps", "log_every"):
    if not isinstance(t[key], int) or t[key] <= 0:
      fail(f"config.train.{key}={t[key]!r} must be a positive integer")
  for key in ("eval_every", "eval_batches", "checkpoint_every", "stop_at_step",
              "max_nonfinite_steps", "spike_window"):
    if not isinstance(t[key], int) or t[key] < 0:
      fail(f"config.train.{key}={t[key]!r} must be a non-negative integer")
  if t.batch_size % t.grad_accum_steps:
    fail(f"config.train.batch_size={t.batch_size} is not divisible by "
         f"grad_accum_steps={t.grad_accum_steps}")
  if t.seq_len > config.model.max_position_embeddings:
    fail(f"config.train.seq_len={t.seq_len} exceeds the model's max_position_embeddings="
         f"{config.model.max_position_embeddings}; shorten seq_len or raise "
         f"config.model.max_position_embeddings (pretrained checkpoints have 512)")
  if t.seq_len < 8:
    fail(f"config.train.seq_len={t.seq_len} is too short (at least 8)")
  m = config.masking
  if not 0.0 < m.rate < 1.0:
    fail(f"config.masking.rate={m.rate} must be in (0, 1)")
  if m.mask_prob < 0 or m.random_prob < 0 or m.mask_prob + m.random_prob > 1:
    fail(f"config.masking mask_prob={m.mask_prob} + random_prob={m.random_prob} must be within [0, 1]")
  if not 0.0 < m.geometric_p <= 1.0 or m.max_span < 1:
    fail(f"config.masking geometric_p={m.geometric_p} must be in (0, 1] and max_span={m.max_span} >= 1")
  from spanlm.objectives.base import OBJECTIVES  # local: pretraining imports the model code
  if config.objective.name not in OBJECTIVES:
    fail(f"config.objective.name={config.objective.name!r}; choose one of {sorted(OBJECTIVES)}")
  if config.objective.name in ("mlm_nsp", "mlm_sop") and config.data.packing == "packed":
    fail(f"config.objective.name={config.objective.name!r} builds sentence pairs from single-document "
         f"rows; use config.data.packing='document' (not 'packed')")
  if m.replacement not in ("", "uniform", "unigram"):
    fail(f"config.masking.replacement={m.replacement!r}; choose uniform, unigram or '' (the scheme's paper's)")
  if m.smoothing < 0 or (m.smoothing > 0 and m.scheme != "token"):
    fail(f"config.masking.smoothing={m.smoothing} must be >= 0, and > 0 only with masking.scheme='token'")
  if not isinstance(m.max_predictions, int) or m.max_predictions < 0:
    fail(f"config.masking.max_predictions={m.max_predictions!r} must be an integer >= 0 (0 = no cap)")
  if not isinstance(m.max_ngram, int) or m.max_ngram < 1:
    fail(f"config.masking.max_ngram={m.max_ngram!r} must be a positive integer")
  e = config.model.embedding_size
  if e is not None and (not isinstance(e, int) or e <= 0):
    fail(f"config.model.embedding_size={e!r} must be a positive integer or None (= hidden_size)")
  if config.optimizer.learning_rate <= 0 or not math.isfinite(config.optimizer.learning_rate):
    fail(f"config.optimizer.learning_rate={config.optimizer.learning_rate} must be positive")
  ewc = config.get("ewc")
  if ewc is not None and (ewc.lambda_ < 0 or (ewc.lambda_ and not ewc.fisher_path)):
    fail(f"config.ewc.lambda_={ewc.lambda_} needs to be >= 0, and > 0 only with config.ewc.fisher_path "
         "set (the .npz written by tools/compute_fisher.py)")
  if ewc is not None and ewc.get("init_from_theta") and not ewc.fisher_path:
    fail("config.ewc.init_from_theta=True needs config.ewc.fisher_path (tools/compute_fisher.py's .npz)")
  _validate_optimizer(config, fail)


def _validate_optimizer(config, fail) -> None:
  """config.optimizer / config.schedule checks (spanlm.optim's names and ranges)."""
  import re
  from spanlm.optim import HYPERGRADIENT, OPTIMIZERS
  from spanlm.optim.schedules import ALIASES, CYCLICAL, SCHEDULES
  o, s = config.optimizer, config.schedule
  groups = tuple(o.groups or ())
  for i, g in enumerate(groups):
    where = f"config.optimizer.groups[{i}]"
    if not isinstance(g, dict) or not isinstance(g.get("pattern"), str):
      fail(f"{where}={g!r} must be a dict with a 'pattern' regex over '/'-joined parameter paths")
    try:
      re.compile(g["pattern"])
    except re.error as e:
      fail(f"{where} pattern {g['pattern']!r} is not a regular expression ({e})")
    unknown = sorted(k for k in g if k not in ("pattern", "label") and (k == "groups" or k not in o))
    if unknown:
      fail(f"{where} has unknown keys {unknown}; overrides must be config.optimizer keys")
  for i, opt in enumerate([o] + [{**o.to_dict(), **g} for g in groups]):
    where = "config.optimizer" if i == 0 else f"config.optimizer.groups[{i - 1}]"
    name = opt["name"]
    if name not in OPTIMIZERS + (("frozen",) if i else ()):
      fail(f"{where}.name={name!r}; choose one of {OPTIMIZERS}" + (" or 'frozen'" if i else ""))
    lr = opt["learning_rate"]
    if not isinstance(lr, (int, float)) or lr <= 0 or not math.isfinite(lr):
      fail(f"{where}.learning_rate={lr!r} must be a positive number")
    for key in ("b1", "b2", "momentum"):
      if not 0.0 <= opt[key] < 1.0:
        fail(f"{where}.{key}={opt[key]} must be in [0, 1)")
    for key in ("eps", "weight_decay", "trust_min_norm", "trust_max_norm", "hyper_lr", "grad_clip"):
      if opt[key] < 0:
        fail(f"{where}.{key}={opt[key]} must be non-negative")
    if opt["eps"] == 0 and name in ("adamw", "adam", "lamb", "adam_hd"):
      fail(f"{where}.eps must be positive for {name}")
    if opt["trust_coefficient"] <= 0:
      fail(f"{where}.trust_coefficient={opt['trust_coefficient']} must be positive")
    if opt["trust_max_norm"] and opt["trust_max_norm"] < opt["trust_min_norm"]:
      fail(f"{where}.trust_max_norm={opt['trust_max_norm']} is below trust_min_norm={opt['trust_min_norm']}")
  name = ALIASES.get(s.name, s.name)
  if name not in SCHEDULES:
    fail(f"config.schedule.name={s.name!r}; choose one of {SCHEDULES} (aliases {tuple(ALIASES)})")
  if any(g.get("name", o.name) in HYPERGRADIENT for g in (o, *groups)) and (
      name != "constant" or s.warmup_steps):
    fail(f"config.optimizer.name={o.name!r} adapts its own learning rate from "
         f"config.optimizer.learning_rate; set config.schedule.name=constant and "
         f"config.schedule.warmup_steps=0")
  if s.warmup_steps < 0:
    fail(f"config.schedule.warmup_steps={s.warmup_steps} must be >= 0")
  if s.warmup_steps > config.train.num_steps:
    clamped = config.train.num_steps // 10
    try:
      s.warmup_steps = clamped
    except (AttributeError, ValueError, TypeError):  # a FrozenConfigDict cannot be changed
      fail(f"config.schedule.warmup_steps={s.warmup_steps} is longer than the run "
           f"(train.num_steps={config.train.num_steps}); lower it")
    from absl import logging
    logging.warning("config.schedule.warmup_steps was longer than the run (train.num_steps=%d); using "
                    "warmup_steps=%d (10%% of the run). Set --config.schedule.warmup_steps to choose.",
                    config.train.num_steps, clamped)
  if not 0 <= s.min_learning_rate < o.learning_rate:
    fail(f"config.schedule.min_learning_rate={s.min_learning_rate} must be in [0, "
         f"config.optimizer.learning_rate={o.learning_rate}) (it is the floor/base; the LR is the peak)")
  if name in CYCLICAL and s.min_learning_rate <= 0:
    fail(f"config.schedule.min_learning_rate must be positive for {name} (it is the cycle's base LR; "
         f"e.g. the low end of an LR range test)")
  if s.power <= 0:
    fail(f"config.schedule.power={s.power} must be positive")
  if not isinstance(s.cycle_steps, int) or s.cycle_steps < 0:
    fail(f"config.schedule.cycle_steps={s.cycle_steps!r} must be a non-negative integer (0 = num_steps // 2)")
  if not 0 < s.gamma <= 1:
    fail(f"config.schedule.gamma={s.gamma} must be in (0, 1]")
  if not 0 < s.pct_start <= 0.5:
    fail(f"config.schedule.pct_start={s.pct_start} must be in (0, 0.5]")
  if s.final_div_factor < 1:
    fail(f"config.schedule.final_div_factor={s.final_div_factor} must be >= 1")
