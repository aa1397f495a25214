"""Pluggable pretraining objectives: what the train step computes, as one object.

`Trainer` (spanlm/train.py) owns sharding, micro-batching, the optimizer and the
loop; an `Objective` owns everything the loss needs. `make_objective(config, ...)`
picks one by `config.objective.name` from `OBJECTIVES` (name -> "module:Class",
imported lazily, so an objective living in its own module only adds a line here).

The contract (all methods are traced inside jit; shapes are static):

  model                      the flax module (`build_model()` makes it once)
  init_params(rng)           boxed (nn.Partitioned) params from dummy inputs
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

Objectives here: 'mlm' (BERT/SpanBERT masked LM, + SBO when objective.sbo),
'mlm_nsp' (+ next sentence prediction) and 'mlm_sop' (+ ALBERT's sentence
order prediction), see `MaskedLMWithPairs` for how pairs are built.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spanlm import masking, objectives
from spanlm.models.bert import config_for
from spanlm.models.heads import BertForPretraining

# name -> "module:Class". Other objectives register here (one line each).
OBJECTIVES: dict[str, str] = {
    "mlm": "spanlm.pretraining:MaskedLM",
    "mlm_nsp": "spanlm.pretraining:MaskedLMWithPairs",
    "mlm_sop": "spanlm.pretraining:MaskedLMWithPairs",
    "electra": "spanlm.electra:Electra",  # H5: replaced-token detection (Clark et al. 2020)
    "distill": "spanlm.distill:Distill",  # H5: DistilBERT/TinyBERT student from a teacher workdir
    "mapnet": "spanlm.mapnet:Mapnet",  # H5: masks from a learned proposal, importance-weighted MLM
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
    pos = jnp.zeros((1, masking.max_predictions(self.seq_len, self.config.masking.rate)), jnp.int32)
    return ids, ids, ids != masking.PAD_ID, pos

  def init_params(self, rng):
    return self.model.init({"params": rng}, *self.dummy_inputs())["params"]

  def frozen_inputs(self, mesh) -> Any:
    return None

  def prepare(self, rng, batch) -> dict:
    raise NotImplementedError

  def denominators(self, prepared) -> dict:
    raise NotImplementedError

  def sums(self, params, mb, rng, deterministic: bool, frozen=None) -> dict:
    raise NotImplementedError

  def loss(self, sums, den):
    raise NotImplementedError

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


def packed_keys() -> tuple[str, ...]:
  """Per-token features of packed rows (config.data.packing='packed') that reach the model."""
  from spanlm.train import PACKED_KEYS  # defined with the batch shardings; train imports us
  return PACKED_KEYS


def _per(total, count):
  return total / jnp.maximum(count, 1.0)


class MaskedLM(Objective):
  """BERT's masked LM (any `config.masking.scheme`), plus SpanBERT's SBO when `objective.sbo`.

  L = (Σ CE_mlm + sbo_weight · Σ CE_sbo) / N_pred  (SpanBERT eq. 3, per predicted token).
  """

  name = "mlm"
  pair_head = False

  def __init__(self, config, vocab_size, word_start_table):
    self.num_predictions = masking.max_predictions(config.train.seq_len, config.masking.rate)
    super().__init__(config, vocab_size, word_start_table)

  def build_model(self):
    o = self.config.objective
    cfg = encoder_config(self.config, self.vocab_size, **({"use_pooler": True} if self.pair_head else {}))
    return BertForPretraining(cfg, sbo=bool(o.sbo), max_span_tokens=int(o.max_span_tokens),
                              pair_head=self.pair_head)

  def dummy_inputs(self):
    ids, segments, attention_mask, pos = super().dummy_inputs()
    return ids, segments, attention_mask, pos, pos, pos + 1  # + SBO span boundaries

  def mask(self, rng, input_ids) -> masking.MaskedBatch:
    return masking.apply_masking(rng, input_ids, self.word_start_table, self.config.masking,
                                 vocab_size=self.vocab_size)

  def prepare(self, rng, batch):
    """Mask the whole batch once, then gather the P predicted positions per row."""
    masked = self.mask(rng, batch["input_ids"])
    preds = objectives.select_predictions(masked, self.num_predictions)
    return dict(input_ids=masked.input_ids, segment_ids=batch["segment_ids"],
                attention_mask=batch["input_ids"] != masking.PAD_ID, positions=preds.positions,
                targets=preds.targets, weights=preds.weights, left=preds.left, right=preds.right,
                **{k: batch[k] for k in packed_keys() if k in batch})

  def denominators(self, prepared):
    return {"num_predictions": jnp.sum(prepared["weights"]),
            "rows": jnp.float32(prepared["input_ids"].shape[0])}

  def _outputs(self, params, mb, rng, deterministic):
    return self.model.apply(
        {"params": params}, mb["input_ids"], mb["segment_ids"], mb["attention_mask"],
        mb["positions"], mb["left"], mb["right"], deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng},
        **{k: mb[k] for k in packed_keys() if k in mb})

  def _mlm_sums(self, outputs, mb):
    preds = objectives.Predictions(mb["positions"], mb["targets"], mb["weights"], mb["left"], mb["right"])
    return objectives.pretraining_sums(outputs, preds, self.vocab_size)

  def sums(self, params, mb, rng, deterministic, frozen=None):
    return self._mlm_sums(self._outputs(params, mb, rng, deterministic), mb)

  def loss(self, sums, den):
    return _per(objectives.total_loss(sums, self.config.objective.sbo_weight), den["num_predictions"])

  def metrics(self, sums, den):
    n = den["num_predictions"]
    out = {"loss": self.loss(sums, den), "mlm_loss": _per(sums["mlm_loss"], n),
           "mlm_accuracy": _per(sums["mlm_correct"], n)}
    if "sbo_loss" in sums:
      out["sbo_loss"] = _per(sums["sbo_loss"], n)
      out["sbo_accuracy"] = _per(sums["sbo_correct"], n)
    out["predictions_per_row"] = _per(n, den["rows"])
    return out

  def eval_metrics(self, sums, den):
    out = {k: float(v) for k, v in self.metrics(sums, den).items()}
    result = {"eval/mlm_loss": out["mlm_loss"], "eval/mlm_accuracy": out["mlm_accuracy"],
              "eval/perplexity": float(np.exp(min(out["mlm_loss"], 50.0))),
              "eval/num_predictions": float(den["num_predictions"])}
    for k in ("sbo_loss", "sbo_accuracy", "pair_loss", "pair_accuracy"):
      if k in out:
        result[f"eval/{k}"] = out[k]
    return result

  def log_summary(self, metrics, prefix=""):
    g = lambda k: metrics[prefix + k]
    out = f"loss {g('loss'):.3f} | mlm {g('mlm_loss'):.3f} acc {g('mlm_accuracy'):.3f}"
    if prefix + "sbo_loss" in metrics:
      out += f" | sbo {g('sbo_loss'):.3f}"
    if prefix + "pair_loss" in metrics:
      out += f" | {self._pair_name} {g('pair_loss'):.3f} acc {g('pair_accuracy'):.3f}"
      if g("pair_fallback_rows") > 0:  # rows too short for a pair (see spanlm/pairs.py)
        out += f" ({g('pair_fallback_rows'):.1f} single-segment rows/step)"
    return out

  def eval_summary(self, result):
    out = (f"mlm loss {result['eval/mlm_loss']:.3f} | acc {result['eval/mlm_accuracy']:.3f} | "
           f"ppl {result['eval/perplexity']:.1f}")
    if "eval/sbo_loss" in result:
      out += f" | sbo {result['eval/sbo_loss']:.3f}"
    if "eval/pair_loss" in result:
      out += f" | {self._pair_name} {result['eval/pair_loss']:.3f} acc {result['eval/pair_accuracy']:.3f}"
    return out

  _pair_name = "pair"


class MaskedLMWithPairs(MaskedLM):
  """MLM + a two-class sentence-pair task on the pooled [CLS]: NSP ('mlm_nsp') or SOP ('mlm_sop').

  Pairs are built on device in `prepare` (see `spanlm.pairs.make_pairs`), from
  the rows of the global batch, before masking: fresh pairs every step. The
  pair loss is per pair row; rows too short to split are single-segment
  fallbacks with zero pair weight, counted in `pair_fallback_rows`.
  """

  pair_head = True

  def __init__(self, config, vocab_size, word_start_table):
    self.task = {"mlm_nsp": "nsp", "mlm_sop": "sop"}[config.objective.name]
    self._pair_name = self.task
    super().__init__(config, vocab_size, word_start_table)

  def prepare(self, rng, batch):
    from spanlm import pairs  # local: pairs imports masking only
    pair_rng, mask_rng = jax.random.split(rng)
    built = pairs.make_pairs(pair_rng, batch["input_ids"], self.task)
    prepared = super().prepare(mask_rng, {"input_ids": built.input_ids, "segment_ids": built.segment_ids})
    prepared.update(pair_labels=built.labels, pair_weights=built.weights)
    return prepared

  def denominators(self, prepared):
    den = super().denominators(prepared)
    den["num_pairs"] = jnp.sum(prepared["pair_weights"])
    return den

  def sums(self, params, mb, rng, deterministic, frozen=None):
    outputs = self._outputs(params, mb, rng, deterministic)
    sums = self._mlm_sums(outputs, mb)
    loss, correct = objectives.weighted_cross_entropy(outputs["pair_logits"], mb["pair_labels"],
                                                      mb["pair_weights"])
    sums.update(pair_loss=loss, pair_correct=correct,
                pair_positive=jnp.sum(mb["pair_weights"] * mb["pair_labels"]),
                pair_fallback_rows=jnp.sum(1.0 - mb["pair_weights"]))
    return sums

  def loss(self, sums, den):
    w = float(self.config.objective.pair_weight)
    return super().loss(sums, den) + w * _per(sums["pair_loss"], den["num_pairs"])

  def metrics(self, sums, den):
    out = super().metrics(sums, den)
    out.update(pair_loss=_per(sums["pair_loss"], den["num_pairs"]),
               pair_accuracy=_per(sums["pair_correct"], den["num_pairs"]),
               pair_label_rate=_per(sums["pair_positive"], den["num_pairs"]),
               pair_fallback_rows=sums["pair_fallback_rows"])
    return out
