"""Masked-LM objectives: BERT's MLM (any masking scheme) with SpanBERT's SBO, and MLM + NSP/SOP.

'mlm' is BERT's masked LM (Devlin et al. 2019) or, with `objective.sbo` and span
masking, SpanBERT's MLM + Span Boundary Objective (Joshi et al. 2020); 'mlm_nsp'
and 'mlm_sop' add BERT's next sentence prediction or ALBERT's sentence order
prediction on the pooled [CLS] (pairs built on device, objectives/pairs.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spanlm.models.heads import BertForPretraining
from spanlm.objectives import losses, masking, pairs
from spanlm.objectives.base import Objective, encoder_config, packed_keys, per

class MaskedLM(Objective):
  """BERT's masked LM (any `config.masking.scheme`), plus SpanBERT's SBO when `objective.sbo`.

  L = Σ CE_mlm / N_pred + sbo_weight · Σ CE_sbo / N_sbo, as SpanBERT's criterion
  (`span_bert_loss`): SBO targets are the first `objective.sbo_max_targets` (15)
  tokens of each merged span whose two boundaries are text (masking.sbo_weights),
  normalised by their own count.
  """

  name = "mlm"
  pair_head = False

  def __init__(self, config, vocab_size, word_start_table):
    self.num_predictions = masking.max_predictions(config.train.seq_len, config.masking.rate,
                                                   config.masking.get("max_predictions", 0))
    super().__init__(config, vocab_size, word_start_table)

  def build_model(self):
    o = self.config.objective
    cfg = encoder_config(self.config, self.vocab_size, **({"use_pooler": True} if self.pair_head else {}))
    return BertForPretraining(cfg, sbo=bool(o.sbo), sbo_max_targets=int(o.sbo_max_targets),
                              sbo_position_size=int(o.sbo_position_size), pair_head=self.pair_head)

  def dummy_inputs(self):
    ids, segments, attention_mask, pos = super().dummy_inputs()
    return ids, segments, attention_mask, pos, pos, pos + 1  # + SBO span boundaries

  def mask(self, rng, input_ids) -> masking.MaskedBatch:
    return masking.apply_masking(rng, input_ids, self.word_start_table, self.config.masking,
                                 vocab_size=self.vocab_size)

  def prepare(self, rng, batch):
    """Mask the whole batch once, then gather the P predicted positions per row."""
    masked = self.mask(rng, batch["input_ids"])
    sbo = masking.sbo_weights(masked, batch["input_ids"], int(self.config.objective.sbo_max_targets))
    preds = losses.select_predictions(masked, self.num_predictions, sbo)
    return dict(input_ids=masked.input_ids, segment_ids=batch["segment_ids"],
                attention_mask=batch["input_ids"] != masking.PAD_ID, positions=preds.positions,
                targets=preds.targets, weights=preds.weights, left=preds.left, right=preds.right,
                sbo_weights=preds.sbo_weights, **{k: batch[k] for k in packed_keys() if k in batch})

  def eval_targets(self, prepared):
    return prepared["targets"], prepared["weights"]

  def denominators(self, prepared):
    return {"num_predictions": jnp.sum(prepared["weights"]),
            "num_sbo_targets": jnp.sum(prepared["sbo_weights"]),
            "rows": jnp.float32(prepared["input_ids"].shape[0])}

  def _outputs(self, params, mb, rng, deterministic):
    return self.model.apply(
        {"params": params}, mb["input_ids"], mb["segment_ids"], mb["attention_mask"],
        mb["positions"], mb["left"], mb["right"], deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng},
        **{k: mb[k] for k in packed_keys() if k in mb})

  def _mlm_sums(self, outputs, mb):
    preds = losses.Predictions(mb["positions"], mb["targets"], mb["weights"], mb["left"], mb["right"],
                               mb["sbo_weights"])
    return losses.pretraining_sums(outputs, preds, self.vocab_size)

  def sums(self, params, mb, rng, deterministic, frozen=None):
    return self._mlm_sums(self._outputs(params, mb, rng, deterministic), mb)

  def loss(self, sums, den):
    loss = per(sums["mlm_loss"], den["num_predictions"])
    if "sbo_loss" in sums:
      loss = loss + float(self.config.objective.sbo_weight) * per(sums["sbo_loss"], den["num_sbo_targets"])
    return loss

  def metrics(self, sums, den):
    n = den["num_predictions"]
    out = {"loss": self.loss(sums, den), "mlm_loss": per(sums["mlm_loss"], n),
           "mlm_accuracy": per(sums["mlm_correct"], n)}
    if "sbo_loss" in sums:
      out["sbo_loss"] = per(sums["sbo_loss"], den["num_sbo_targets"])
      out["sbo_accuracy"] = per(sums["sbo_correct"], den["num_sbo_targets"])
      out["sbo_targets_per_row"] = per(den["num_sbo_targets"], den["rows"])
    out["predictions_per_row"] = per(n, den["rows"])
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
      if g("pair_fallback_rows") > 0:  # rows too short for a pair (see objectives/pairs.py)
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

  Pairs are built on device in `prepare` (see `spanlm.objectives.pairs.make_pairs`), from
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
    loss, correct = losses.weighted_cross_entropy(outputs["pair_logits"], mb["pair_labels"],
                                                      mb["pair_weights"])
    sums.update(pair_loss=loss, pair_correct=correct,
                pair_positive=jnp.sum(mb["pair_weights"] * mb["pair_labels"]),
                pair_fallback_rows=jnp.sum(1.0 - mb["pair_weights"]))
    return sums

  def loss(self, sums, den):
    w = float(self.config.objective.pair_weight)
    return super().loss(sums, den) + w * per(sums["pair_loss"], den["num_pairs"])

  def metrics(self, sums, den):
    out = super().metrics(sums, den)
    out.update(pair_loss=per(sums["pair_loss"], den["num_pairs"]),
               pair_accuracy=per(sums["pair_correct"], den["num_pairs"]),
               pair_label_rate=per(sums["pair_positive"], den["num_pairs"]),
               pair_fallback_rows=sums["pair_fallback_rows"])
    return out
