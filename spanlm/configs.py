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

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size (-1 = all remaining devices)
  c.mesh.fsdp = 1  # data-parallel axis that also shards parameters/optimizer state
  c.mesh.model = 1  # tensor-parallel axis (heads, FFN, vocabulary)

  c.data = ml_collections.ConfigDict()
  c.data.corpus = ""  # glob of .txt/.txt.gz files, or a prepared dataset dir; "" = bundled sample
  c.data.tokenizer = ""  # SentencePiece .model; "" = the sample's, or trained on the corpus
  c.data.vocab_size = 8000  # vocabulary size when a tokenizer has to be trained
  c.data.validation_fraction = 0.01  # held-out share of each document's rows

  c.model = ml_collections.ConfigDict()
  c.model.size = "base"  # preset: tiny | mini | small | medium | base | large
  c.model.num_layers = config_dict.placeholder(int)  # overrides of the preset (None = preset)
  c.model.hidden_size = config_dict.placeholder(int)
  c.model.num_heads = config_dict.placeholder(int)
  c.model.intermediate_size = config_dict.placeholder(int)
  c.model.max_position_embeddings = 512  # longest sequence the model accepts
  c.model.dropout_rate = 0.1
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  c.model.attention_impl = ""  # "" (XLA decides) | xla | cudnn
  c.model.vocab_multiple = 128  # embedding rows padded to a multiple of this (sharding, MXU)

  c.masking = ml_collections.ConfigDict()
  c.masking.scheme = "token"  # token | whole_word | span
  c.masking.rate = 0.15  # share of maskable tokens predicted
  c.masking.mask_prob = 0.8  # of predicted units: replaced by [MASK]
  c.masking.random_prob = 0.1  # ... by a random token (the rest kept)
  c.masking.geometric_p = 0.2  # span length in words ~ Geo(p), truncated (span only)
  c.masking.max_span = 10  # longest span in words (span only)

  c.objective = ml_collections.ConfigDict()
  c.objective.sbo = False  # add SpanBERT's span boundary objective
  c.objective.sbo_weight = 1.0  # L = L_MLM + sbo_weight * L_SBO
  c.objective.max_span_tokens = 64  # SBO relative-position table size (longer spans clip)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | adam | sgd
  c.optimizer.learning_rate = 1e-4  # peak learning rate
  c.optimizer.weight_decay = 0.01  # decoupled; not on LayerNorm or biases
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.optimizer.grad_clip = 1.0  # global-norm clipping (0 = off)
  c.optimizer.momentum = 0.9  # sgd only

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "linear"  # linear | cosine | constant, after warmup
  c.schedule.warmup_steps = 100  # linear warmup from 0 to the peak, in steps

  c.lock()
  return c


def load(spec: str) -> ml_collections.ConfigDict:
  """Load `path/to/experiment.py[:preset]` as --config would (for notebooks and tools)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"experiment file {path!r} not found (expected e.g. experiments/span_bert.py:tiny)")
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
    ("model", "attention_impl"): ("", "xla", "cudnn"),
    ("masking", "scheme"): ("token", "whole_word", "span"),
}


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ValueError naming the field and what to do, before anything is built."""
  def fail(msg):
    raise ValueError(f"invalid config: {msg}")

  for (group, key), choices in _CHOICES.items():
    if config[group][key] not in choices:
      fail(f"config.{group}.{key}={config[group][key]!r}; choose one of {choices}")
  t = config.train
  for key in ("num_steps", "batch_size", "seq_len", "grad_accum_steps", "log_every"):
    if not isinstance(t[key], int) or t[key] <= 0:
      fail(f"config.train.{key}={t[key]!r} must be a positive integer")
  for key in ("eval_every", "eval_batches", "checkpoint_every", "stop_at_step"):
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
  if config.optimizer.learning_rate <= 0 or not math.isfinite(config.optimizer.learning_rate):
    fail(f"config.optimizer.learning_rate={config.optimizer.learning_rate} must be positive")
