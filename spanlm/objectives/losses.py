"""Pretraining losses: masked-LM and SpanBERT's Span Boundary Objective.

Losses are returned as *sums* over predicted tokens together with the number of
predicted tokens, so that gradient accumulation and data parallelism normalise
once by the global count: an accumulated step is then exactly the large-batch
step, and a sharded step exactly the single-device step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from spanlm.objectives.masking import MaskedBatch


class Predictions(NamedTuple):
  """The P predicted positions of each row, gathered from a MaskedBatch."""

  positions: jax.Array  # [B, P] int32
  targets: jax.Array  # [B, P] int32
  weights: jax.Array  # [B, P] float32; 0 where a row has fewer than P predictions
  left: jax.Array  # [B, P] int32, span boundary s-1
  right: jax.Array  # [B, P] int32, span boundary e+1
  sbo_weights: jax.Array | None = None  # [B, P] float32: SBO targets (masking.sbo_weights); None = weights


def select_predictions(masked: MaskedBatch, num_predictions: int, sbo_weights=None) -> Predictions:
  """Masked positions first (in order), padded to a static P per row.

  Masking never predicts more than `max_predictions(L, rate, cap)` tokens per
  row, so with P equal to that bound no prediction is dropped. `sbo_weights`
  [B, L] (masking.sbo_weights) are gathered alongside when given.
  """
  order = jnp.argsort(masked.weights <= 0, axis=-1, stable=True)[:, :num_predictions]
  take = lambda a: jnp.take_along_axis(a, order, axis=1)
  return Predictions(order.astype(jnp.int32), take(masked.targets), take(masked.weights),
                     take(masked.left), take(masked.right),
                     None if sbo_weights is None else take(sbo_weights))


def weighted_cross_entropy(logits, targets, weights, num_classes: int | None = None):
  """Sum of token cross-entropies and of correct argmax predictions, weighted.

  `num_classes` < logits.shape[-1] excludes vocabulary padding from the softmax.
  """
  logits = logits.astype(jnp.float32)
  if num_classes is not None and num_classes < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < num_classes, logits, -1e9)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return jnp.sum(ce * weights), jnp.sum(correct * weights)


def pretraining_sums(outputs: dict, preds: Predictions, num_classes: int) -> dict:
  """Loss/accuracy sums for every head present in `outputs`, and the target counts.

  MLM sums run over the predicted tokens, SBO sums over the SBO targets
  (`preds.sbo_weights`: SpanBERT gives no SBO target to a span touching the
  block's edges, and at most 15 per span); each has its own count.
  """
  sums = {"num_predictions": jnp.sum(preds.weights)}
  if "mlm_logits" in outputs:
    sums["mlm_loss"], sums["mlm_correct"] = weighted_cross_entropy(
        outputs["mlm_logits"], preds.targets, preds.weights, num_classes)
  if "sbo_logits" in outputs:
    w = preds.weights if preds.sbo_weights is None else preds.sbo_weights
    sums["sbo_loss"], sums["sbo_correct"] = weighted_cross_entropy(
        outputs["sbo_logits"], preds.targets, w, num_classes)
    sums["num_sbo_targets"] = jnp.sum(w)
  return sums


def total_loss(sums: dict, sbo_weight: float = 1.0):
  """SpanBERT's loss as its criterion (`span_bert_loss`) computes it:

    L = Σ CE_mlm / N_mlm + sbo_weight · Σ CE_sbo / N_sbo,

  each term normalised by its own number of targets (the paper's eq. 3 sums the
  two per token; the code's SBO targets are a subset, so it normalises apart).
  """
  loss = sums["mlm_loss"] / jnp.maximum(sums["num_predictions"], 1.0)
  if "sbo_loss" in sums:
    loss = loss + sbo_weight * sums["sbo_loss"] / jnp.maximum(sums["num_sbo_targets"], 1.0)
  return loss


def summarize(sums: dict, sbo_weight: float = 1.0) -> dict:
  """Means per target from accumulated sums (for logging)."""
  n = jnp.maximum(sums["num_predictions"], 1.0)
  out = {"loss": total_loss(sums, sbo_weight),
         "mlm_loss": sums["mlm_loss"] / n,
         "mlm_accuracy": sums["mlm_correct"] / n}
  if "sbo_loss" in sums:
    m = jnp.maximum(sums["num_sbo_targets"], 1.0)
    out["sbo_loss"] = sums["sbo_loss"] / m
    out["sbo_accuracy"] = sums["sbo_correct"] / m
  return out
