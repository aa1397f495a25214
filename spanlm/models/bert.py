"""BERT encoder (Devlin et al. 2019) in flax.linen.

Post-LayerNorm Transformer encoder with token, position and segment embeddings
and exact (erf) GELU, as in the original BERT. Every parameter carries logical
axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `pos`, `type`); the mapping
to mesh axes lives in `spanlm.parallel`, so the model never names a device.

Attention goes through `jax.nn.dot_product_attention` (cuDNN flash attention on
GPU when `attention_impl='cudnn'`). That function has no dropout on attention
probabilities, so BERT's attention dropout is not applied; hidden-state dropout
is. Parameters are float32; `dtype` sets the compute dtype (bf16 for speed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spanlm.parallel import constrain

# Sizes from Devlin et al. 2019 (base, large) and Turc et al. 2019,
# "Well-Read Students Learn Better" (the BERT miniatures: tiny, mini, small, medium).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512),
    "mini": dict(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024),
    "small": dict(num_layers=4, hidden_size=512, num_heads=8, intermediate_size=2048),
    "medium": dict(num_layers=8, hidden_size=512, num_heads=8, intermediate_size=2048),
    "base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),
    "large": dict(num_layers=24, hidden_size=1024, num_heads=16, intermediate_size=4096),
}


# Rematerialisation (activation checkpointing, Chen et al. 2016) of each encoder
# layer: 'none' saves every activation for the backward pass; 'full' saves only
# the layer input and recomputes the rest (~1/3 more FLOPs, far less memory);
# the others save matmul outputs (cheap to keep, costly to recompute).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Logical axes of the hidden states between layers: rows over the data axes,
# the rest replicated. Constraining them
# keeps XLA from re-sharding the embedding gather's output along `fsdp`
# (the rules live in spanlm.parallel; a no-op outside `parallel.activation_sharding`).
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Encoder hyperparameters (names follow the BERT paper's table)."""

  vocab_size: int
  num_layers: int = 12
  hidden_size: int = 768
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32
  attention_impl: str | None = None  # None (XLA picks), 'xla' or 'cudnn'
  use_pooler: bool = False  # the [CLS] pooler, needed by NSP/SOP and classifiers
  remat: str = "none"  # activation checkpointing per layer: a key of REMAT_POLICIES
  # ALBERT (Lan et al. 2020, §3.1): embeddings of size E projected to H (V·E + E·H parameters
  # instead of V·H; None = E = H, no projection), and cross-layer parameter sharing:
  # none | all (one layer applied num_layers times) | attention | ffn (only that sub-block shared).
  embedding_size: int | None = None
  share_layers: str = "none"
  # Heads switched off, as "layer:head" strings (0-based): their attention output is multiplied by
  # 0 before the output projection (head ablation, Michel et al. 2019; tools/ablate_heads.py).
  head_mask: tuple[str, ...] = ()

  def __post_init__(self):
    if self.share_layers not in ("none", "all", "attention", "ffn"):
      raise ValueError(f"share_layers={self.share_layers!r}; choose none | all | attention | ffn")
    if isinstance(self.head_mask, str):  # "0:1,2:3" from a config string
      object.__setattr__(self, "head_mask", tuple(h for h in self.head_mask.replace(" ", "").split(",") if h))
    object.__setattr__(self, "head_mask", tuple(self.head_mask))  # hashable: modules hash their config
    head_keep(self, 0)  # validates head_mask early
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def embed_dim(self) -> int:
    """E: the width of the embedding tables (= hidden_size unless factorized)."""
    return self.embedding_size or self.hidden_size


def config_for(size: str, vocab_size: int, **overrides) -> BertConfig:
  """A preset by name (`tiny` ... `large`) with per-field overrides."""
  if size not in PRESETS:
    raise ValueError(f"unknown model size {size!r}; choose one of {sorted(PRESETS)}")
  return BertConfig(vocab_size=vocab_size, **{**PRESETS[size], **overrides})


def head_keep(cfg: BertConfig, layer: int):
  """Per-head multipliers [num_heads] (1 = on, 0 = masked) for `layer`, or None if none is masked."""
  masked = set()
  for spec in cfg.head_mask:
    try:
      l, h = (int(v) for v in str(spec).split(":"))
    except ValueError:
      raise ValueError(f"head_mask entry {spec!r} is not 'layer:head', e.g. '3:7'") from None
    if not (0 <= l < cfg.num_layers and 0 <= h < cfg.num_heads):
      raise ValueError(f"head_mask entry {spec!r} is outside {cfg.num_layers} layers x {cfg.num_heads} heads")
    masked.add((l, h))
  if masked and cfg.share_layers in ("all", "attention"):
    raise NotImplementedError("head_mask with shared attention layers (ALBERT share_layers="
                              f"{cfg.share_layers!r}): one module serves every layer")
  if not any(l == layer for l, _ in masked):
    return None
  return np.asarray([0.0 if (layer, h) in masked else 1.0 for h in range(cfg.num_heads)], np.float32)


def _init(cfg: BertConfig, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), names)


def _zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def layer_norm(cfg: BertConfig, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, scale_init=_ones(("embed",)),
      bias_init=_zeros(("embed",)), name=name)


def dense(cfg: BertConfig, features: int, names: tuple[str, str], name: str) -> nn.Dense:
  return nn.Dense(features, dtype=cfg.dtype, kernel_init=_init(cfg, names),
                  bias_init=_zeros(names[1:]), name=name)


class Embeddings(nn.Module):
  """Token + position + segment embeddings, LayerNorm, dropout; `attend` ties outputs."""

  cfg: BertConfig

  def setup(self):
    cfg = self.cfg
    self.word = self.param("word_embeddings", _init(cfg, ("vocab", "embed")),
                           (cfg.vocab_size, cfg.embed_dim))
    self.position = self.param("position_embeddings", _init(cfg, ("pos", "embed")),
                               (cfg.max_position_embeddings, cfg.embed_dim))
    self.segment = self.param("token_type_embeddings", _init(cfg, ("type", "embed")),
                              (cfg.type_vocab_size, cfg.embed_dim))
    self.norm = layer_norm(cfg, "layer_norm")
    self.dropout = nn.Dropout(cfg.dropout_rate)
    if cfg.embed_dim != cfg.hidden_size:  # ALBERT: project E -> H after LayerNorm and dropout
      self.projection = dense(cfg, cfg.hidden_size, ("embed_in", "embed"), "projection")

  def _table(self, table, rows: str):
    # Gather from (and project onto) a table gathered along `fsdp` like any FSDP weight, so
    # the lookup's output is batch-sharded rather than split along `embed` and re-sharded.
    return constrain(table, (rows, "activation_embed"))

  def __call__(self, input_ids, segment_ids, position_ids, deterministic: bool):
    x = (jnp.take(self._table(self.word, "vocab"), input_ids, axis=0)
         + jnp.take(self._table(self.position, "pos"), position_ids, axis=0)
         + jnp.take(self._table(self.segment, "type"), segment_ids, axis=0))
    x = self.dropout(self.norm(x.astype(self.cfg.dtype)), deterministic=deterministic)
    return self.projection(x) if self.cfg.embed_dim != self.cfg.hidden_size else x

  def attend(self, x):
    """Logits against the (tied) input embedding table, in float32 for a stable loss."""
    return jnp.einsum("...h,vh->...v", x.astype(jnp.float32), self._table(self.word, "vocab"))


class SelfAttention(nn.Module):
  cfg: BertConfig
  layer: int = -1  # index in the encoder, for cfg.head_mask (-1: shared across layers)

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.cfg
    shape = (cfg.num_heads, cfg.head_dim)

    def proj(name):
      return nn.DenseGeneral(shape, dtype=cfg.dtype, kernel_init=_init(cfg, ("embed", "heads", "kv")),
                             bias_init=_zeros(("heads", "kv")), name=name)(x)

    q, k, v = proj("query"), proj("key"), proj("value")
    if self.is_mutable_collection("attentions") and not self.is_initializing():  # init: all mutable
      # apply(..., mutable=["attentions"]) (tools/embed.py --attentions): the fused kernel hides the
      # probabilities, so compute softmax(q k^T / sqrt(d)) explicitly and sow it, [B, heads, T, S].
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(cfg.head_dim).astype(q.dtype)
      probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)
      self.sow("attentions", "probs", probs)
      self.sow("attentions", "scores", scores)  # pre-softmax, unmasked (TinyBERT's attention targets)
      y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    else:
      y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=cfg.attention_impl)
    keep = head_keep(cfg, self.layer)
    if keep is not None:  # y is [B, T, heads, head_dim]: zero the masked heads' context vectors
      y = y * jnp.asarray(keep, y.dtype)[:, None]
    y = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), dtype=cfg.dtype,
                        kernel_init=_init(cfg, ("heads", "kv", "embed")),
                        bias_init=_zeros(("embed",)), name="output")(y)
    return nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)


class FeedForward(nn.Module):
  """Dense(I) -> GELU -> Dense(H) -> dropout: the FFN sub-block, as a module only when shared."""

  cfg: BertConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.cfg
    h = nn.gelu(dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x), approximate=False)
    return nn.Dropout(cfg.dropout_rate)(dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h),
                                        deterministic=deterministic)


class EncoderLayer(nn.Module):
  """Post-LN block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

  cfg: BertConfig
  shared_attention: Any = None  # ALBERT share_layers='attention': the encoder's one SelfAttention
  shared_ffn: Any = None  # ... 'ffn': the encoder's one FeedForward
  layer: int = -1  # index in the encoder (for cfg.head_mask)

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.cfg
    attention = self.shared_attention if self.shared_attention is not None else SelfAttention(cfg, layer=self.layer, name="attention")
    x = layer_norm(cfg, "attention_norm")(x + attention(x, mask, deterministic))
    if self.shared_ffn is not None:
      return layer_norm(cfg, "output_norm")(x + self.shared_ffn(x, deterministic))
    h = nn.gelu(dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x), approximate=False)
    h = nn.Dropout(cfg.dropout_rate)(dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h),
                                     deterministic=deterministic)
    return layer_norm(cfg, "output_norm")(x + h)


class BertEncoder(nn.Module):
  """Returns the final hidden states [B, L, H] (and the pooled [CLS] if `use_pooler`)."""

  cfg: BertConfig

  def setup(self):
    self.embeddings = Embeddings(self.cfg)
    layer = EncoderLayer
    if self.cfg.remat != "none":  # `deterministic` (argument 3, counting self) is a Python bool: static
      layer = nn.remat(EncoderLayer, policy=REMAT_POLICIES[self.cfg.remat], static_argnums=(3,))
    share = self.cfg.share_layers
    if share == "all":  # ALBERT: one set of layer parameters, applied num_layers times
      self.layers = [layer(self.cfg, name="layer_shared")] * self.cfg.num_layers
    else:
      shared = {}
      if share == "attention":
        shared["shared_attention"] = SelfAttention(self.cfg, name="shared_attention")
      if share == "ffn":
        shared["shared_ffn"] = FeedForward(self.cfg, name="shared_ffn")
      self.layers = [layer(self.cfg, name=f"layer_{i}", layer=i, **shared) for i in range(self.cfg.num_layers)]
    if self.cfg.use_pooler:
      self.pooler = dense(self.cfg, self.cfg.hidden_size, ("embed", "embed_out"), "pooler")

  def __call__(self, input_ids, segment_ids=None, attention_mask=None, position_ids=None,
               deterministic: bool = True, packing_ids=None):
    """`packing_ids` [B, L] (packed rows): tokens attend only within their own document."""
    if segment_ids is None:
      segment_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids, dtype=bool)
    # [B, 1, 1, S]: every query attends to the real (non-padding) keys of its row.
    mask = attention_mask.astype(bool)[:, None, None, :]
    if packing_ids is not None:  # block-diagonal [B, 1, T, S]: no attention across documents
      mask = mask & (packing_ids[:, None, :, None] == packing_ids[:, None, None, :])
    x = self.embeddings(input_ids, segment_ids, position_ids, deterministic)
    x = constrain(x, ACTIVATION_AXES)
    for layer in self.layers:
      x = constrain(layer(x, mask, deterministic), ACTIVATION_AXES)
    if self.cfg.use_pooler:
      return x, jnp.tanh(self.pooler(x[:, 0]))
    return x
