"""Pretraining heads over the encoder, evaluated only at the predicted positions.

The heads take hidden states already gathered at the P masked positions of each
row ([B, P, H]), so the vocabulary projection costs B·P·H·V rather than B·L·H·V
(P = ceil(0.15·L)). Both decoders are tied to the input embedding table.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from spanlm.models.bert import (ACTIVATION_AXES, BertConfig, BertEncoder, _init, _zeros, dense,
                                layer_norm)
from spanlm.parallel import constrain


class Transform(nn.Module):
  """Dense(H) -> GELU -> LayerNorm, the BERT prediction-head transform."""

  cfg: BertConfig

  @nn.compact
  def __call__(self, x):
    # Output width E, the (tied) embedding table's: H, or ALBERT's factorized E.
    x = dense(self.cfg, self.cfg.embed_dim, ("embed_in", "embed"), "dense")(x)
    return constrain(layer_norm(self.cfg, "norm")(nn.gelu(x, approximate=False)), ACTIVATION_AXES)


def gather(x, positions):
  """x: [B, L, ...], positions: [B, P] -> [B, P, ...]."""
  out = jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), axis=1)
  # Rows stay batch-sharded (else XLA re-shards [B, P, H] along `fsdp` for the head's kernels).
  return constrain(out, ACTIVATION_AXES) if out.ndim == 3 else out


class SpanBoundaryHead(nn.Module):
  """SpanBERT's Span Boundary Objective (Joshi et al. 2020, eq. 1-2), as its code builds it.

  For a masked token x_i in span (s, e): y_i = f(x_{s-1}, x_{e+1}, p_{i-s}), f a
  2-layer FFN with GELU and LayerNorm after each layer (`MLPWithLayerNorm`) over
  the concatenated boundary states and a learned embedding of the target's index
  in its span (`BertPairTargetPredictionHead` in facebookresearch/SpanBERT
  pretraining/fairseq/models/pair_bert.py: a `max_targets` × 200 table, whatever
  the hidden size; `--max-pair-targets 15 --pair-positional-embedding-size 200`).
  The output feeds a decoder tied to the input embeddings with its own bias.
  """

  cfg: BertConfig
  max_targets: int = 15
  position_size: int = 200

  @nn.compact
  def __call__(self, hidden, left, right, relative_position):
    cfg = self.cfg
    table = self.param("position_embeddings", _init(cfg, (None, None)),
                       (self.max_targets, self.position_size))
    rel = jnp.take(table, jnp.clip(relative_position, 0, self.max_targets - 1), axis=0)
    h = jnp.concatenate([gather(hidden, left), gather(hidden, right), rel.astype(hidden.dtype)], -1)
    for i in range(2):  # the last layer's output feeds the tied decoder: width E (H unless ALBERT)
      width = cfg.hidden_size if i == 0 else cfg.embed_dim
      h = nn.gelu(dense(cfg, width, ("embed_in", "embed"), f"dense_{i}")(h), approximate=False)
      h = constrain(layer_norm(cfg, f"norm_{i}")(h), ACTIVATION_AXES)
    return h


class SentencePairHead(nn.Module):
  """BERT's NSP / ALBERT's SOP classifier: dropout -> Dense(2) on the pooled [CLS] (tanh(W·h_CLS)).

  Logits [B, 2] in float32; class 1 = NotNext (NSP) or swapped (SOP).
  """

  cfg: BertConfig

  @nn.compact
  def __call__(self, pooled, deterministic: bool = True):
    x = nn.Dropout(self.cfg.dropout_rate)(pooled, deterministic=deterministic)
    return dense(self.cfg, 2, ("embed", None), "classifier")(x).astype(jnp.float32)


class BertForPretraining(nn.Module):
  """Encoder + tied MLM head (+ SBO head when `sbo`).

  Returns logits [B, P, V] at `positions` for MLM, and for SBO when enabled.
  """

  cfg: BertConfig
  sbo: bool = False
  sbo_max_targets: int = 15  # SBO targets per span (SpanBERT --max-pair-targets 15)
  sbo_position_size: int = 200  # width of the SBO position table (SpanBERT: 200)
  pair_head: bool = False  # NSP/SOP: 2-way classifier on the pooled [CLS] (needs cfg.use_pooler)

  def setup(self):
    self.encoder = BertEncoder(self.cfg)
    self.mlm_transform = Transform(self.cfg)
    self.mlm_bias = self.param("mlm_bias", _zeros(("vocab",)), (self.cfg.vocab_size,))
    if self.sbo:
      self.sbo_head = SpanBoundaryHead(self.cfg, self.sbo_max_targets, self.sbo_position_size)
      self.sbo_bias = self.param("sbo_bias", _zeros(("vocab",)), (self.cfg.vocab_size,))
    if self.pair_head:
      if not self.cfg.use_pooler:
        raise ValueError("pair_head (NSP/SOP) needs BertConfig.use_pooler=True")
      self.pair_classifier = SentencePairHead(self.cfg)

  def __call__(self, input_ids, segment_ids, attention_mask, positions, left=None, right=None,
               deterministic: bool = True, position_ids=None, packing_ids=None):
    hidden = self.encoder(input_ids, segment_ids, attention_mask, position_ids=position_ids,
                          deterministic=deterministic, packing_ids=packing_ids)
    pooled = None
    if self.cfg.use_pooler:
      hidden, pooled = hidden
    attend = self.encoder.embeddings.attend
    out = {"mlm_logits": attend(self.mlm_transform(gather(hidden, positions))) + self.mlm_bias}
    if self.pair_head:
      out["pair_logits"] = self.pair_classifier(pooled, deterministic)
    if self.sbo:
      y = self.sbo_head(hidden, left, right, positions - left - 1)
      out["sbo_logits"] = attend(y) + self.sbo_bias
    return out
