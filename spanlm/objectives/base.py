"""Pluggable pretraining objectives: what the train step computes, as one object.

`Trainer` (spanlm/train.py) owns sharding, micro-batching, the optimizer and the
loop; an `Objective` owns everything the loss needs. `make_objective(config, ...)`
picks one by `config.objective.name` from `OBJECTIVES` (name -> "module:Class",
imported lazily, so an objective living in its own module only adds a line here).

The contract (all methods are traced inside jit; shapes are static):

  model                      the flax module (`build_model()` makes it once)
  init_params(rng)           boxed (nn.Partitioned) params from dummy inputs
  initial_params(params, frozen)  the starting params (default: `params` unchanged)
  frozen_inputs(mesh)        non-trained inputs of the loss (a teacher's params),
                             already placed on `mesh`, or None. They are passed to
                             the jitted step as an explicit argument -- never
                             baked into the HLO as constants, never checkpointed.
  prepare(rng, batch)        the whole global batch -> dict of arrays with a
                             leading batch dim (masking, pair building... happen
                             here, on device, with fresh randomness every step)
  denominators(prepared)     dict of global, additive, non-differentiable counts
                             (predicted tokens, rows, ...), computed over the
                             WHOLE global batch before the micro-batch scan
  sums(params, mb, rng, deterministic, frozen)
                             dict of additive sums (losses, correct counts) over
                             the rows of one micro-batch
  loss(sums, den)            the scalar training loss; must be LINEAR in `sums`,
                             so sum_j loss(sums_j, den) == loss(sum_j sums_j, den)
                             and accumulated micro-batches give exactly the
                             large-batch gradient, whatever the number of terms
                             and their different denominators
  metrics(sums, den)         dict of scalars logged as train/<key> ('loss' first)
  eval_metrics(sums, den)    dict of python floats 'eval/<key>' from summed sums/den
  log_summary(metrics, prefix) one short human string for the log line

Normalisation: every term of the loss is a sum divided by its own global count,
e.g. MLM+NSP (Devlin et al. 2019, §3.1 / A.2: "the sum of the mean masked LM
likelihood and the mean next sentence prediction likelihood")

  L = Σ_tokens CE_mlm / N_pred  +  Σ_rows CE_nsp / N_rows.

Objectives (one module each, registered in OBJECTIVES): 'mlm' (BERT/SpanBERT
masked LM, + SBO when objective.sbo), 'mlm_nsp' and 'mlm_sop' (objectives/mlm.py),
'electra', 'distill', 'mapnet'.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax.numpy as jnp
import ml_collections

from spanlm.objectives import masking
from spanlm.models.bert import config_for

# name -> "module:Class". Other objectives register here (one line each).
OBJECTIVES: dict[str, str] = {
    "mlm": "spanlm.objectives.mlm:MaskedLM",
    "mlm_nsp": "spanlm.objectives.mlm:MaskedLMWithPairs",
    "mlm_sop": "spanlm.objectives.mlm:MaskedLMWithPairs",
    "electra": "spanlm.objectives.electra:Electra",  # H5: replaced-token detection (Clark et al. 2020)
    "distill": "spanlm.objectives.distill:Distill",  # H5: DistilBERT/TinyBERT student from a teacher workdir
    "mapnet": "spanlm.objectives.mapnet:Mapnet",  # H5: masks from a learned proposal, importance-weighted MLM
}


def make_objective(config: ml_collections.ConfigDict, vocab_size: int, word_start_table) -> "Objective":
  name = config.objective.name
  if name not in OBJECTIVES:
    raise ValueError(f"invalid config: config.objective.name={name!r}; choose one of {sorted(OBJECTIVES)}")
  module, _, cls = OBJECTIVES[name].partition(":")
  return getattr(importlib.import_module(module), cls)(config, vocab_size, word_start_table)


def encoder_config(config: ml_collections.ConfigDict, vocab_size: int, **extra):
  """The BertConfig for `config.model` and a tokenizer's vocabulary (rows padded to vocab_multiple)."""
  m = config.model
  multiple = max(int(m.vocab_multiple), 1)
  overrides = {k: m[k] for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size")
               if m[k] is not None}
  # Optional model keys, passed only when the config has them (None = the BertConfig default):
  # ALBERT's embedding_size / share_layers, activation rematerialisation.
  for key in ("embedding_size", "share_layers", "remat", "head_mask", "scan_layers"):
    if key in m and m[key] is not None:
      overrides[key] = m[key]
  overrides.update(extra)
  return config_for(
      m.size, vocab_size=-(-vocab_size // multiple) * multiple,
      max_position_embeddings=m.max_position_embeddings, dropout_rate=m.dropout_rate,
      dtype=jnp.dtype(m.dtype), attention_impl=m.attention_impl or None, **overrides)


class Objective:
  """Base class: holds config, vocabulary and word-start table; subclasses fill in the contract."""

  name = "objective"

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int, word_start_table):
    self.config = config
    self.vocab_size = vocab_size
    self.seq_len = config.train.seq_len
    self.word_start_table = jnp.asarray(word_start_table, dtype=bool)
    if self.word_start_table.shape != (vocab_size,):
      raise ValueError(f"word_start_table has shape {self.word_start_table.shape}, "
                       f"expected ({vocab_size},) for the tokenizer's vocabulary")
    self.model = self.build_model()

  def build_model(self):
    raise NotImplementedError

  def dummy_inputs(self) -> tuple:
    """`model.init` arguments: (input_ids, segment_ids, attention_mask, positions), [1, L] / [1, P]."""
    ids = jnp.zeros((1, self.seq_len), jnp.int32)
    m = self.config.masking
    pos = jnp.zeros((1, masking.max_predictions(self.seq_len, m.rate, m.get("max_predictions", 0))), jnp.int32)
    return ids, ids, ids != masking.PAD_ID, pos

  def init_params(self, rng):
    return self.model.init({"params": rng}, *self.dummy_inputs())["params"]

  def frozen_inputs(self, mesh) -> Any:
    return None

  def initial_params(self, params, frozen):
    """The starting params, given freshly initialised ones and `frozen` (a distillation student
    may start from its teacher's layers); runs inside the jitted init."""
    return params

  def prepare(self, rng, batch) -> dict:
    raise NotImplementedError

  def denominators(self, prepared) -> dict:
    raise NotImplementedError

  def sums(self, params, mb, rng, deterministic: bool, frozen=None) -> dict:
    raise NotImplementedError

  def loss(self, sums, den):
    raise NotImplementedError

  def eval_targets(self, prepared):
    """(targets, weights), each [B, P], of the held-out MLM loss on the `prepare`d batch `prepared`:
    eval/mlm_loss is Σ weights · CE(targets) / denominators(prepared)['num_predictions'].

    The Trainer scores the unigram model on exactly these targets with the same weights
    (eval/unigram_mlm_loss, `Trainer._unigram_loss`). None (this default) for an objective whose
    held-out loss is not such an MLM loss: it then logs no unigram baseline.
    """
    return None

  def metrics(self, sums, den) -> dict:
    raise NotImplementedError

  def eval_metrics(self, sums, den) -> dict:
    return {f"eval/{k}": float(v) for k, v in self.metrics(sums, den).items()}

  def log_summary(self, metrics: dict, prefix: str = "") -> str:
    """The train log line's objective part, from averaged metrics."""
    return " | ".join(f"{k} {metrics[prefix + k]:.3f}" for k in ("loss",) if prefix + k in metrics)

  def eval_summary(self, result: dict) -> str:
    """The eval log line's part after 'held-out', from `eval_metrics`' output."""
    return " | ".join(f"{k[5:]} {v:.3f}" for k, v in result.items())


# Per-token features of packed rows (config.data.packing='packed') that reach the model.
PACKED_KEYS = ("position_ids", "packing_ids")


def packed_keys() -> tuple[str, ...]:
  return PACKED_KEYS


def per(total, count):
  """total / count, with count clamped to >= 1 (an empty micro-batch or eval split)."""
  return total / jnp.maximum(count, 1.0)
