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

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def config_for(size: str, vocab_size: int, **overrides) -> BertConfig:
  """A preset by name (`tiny` ... `large`) with per-field overrides."""
  if size not in PRESETS:
    raise ValueError(f"unknown model size {size!r}; choose one of {sorted(PRESETS)}")
  return BertConfig(vocab_size=vocab_size, **{**PRESETS[size], **overrides})


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
                           (cfg.vocab_size, cfg.hidden_size))
    self.position = self.param("position_embeddings", _init(cfg, ("pos", "embed")),
                               (cfg.max_position_embeddings, cfg.hidden_size))
    self.segment = self.param("token_type_embeddings", _init(cfg, ("type", "embed")),
                              (cfg.type_vocab_size, cfg.hidden_size))
    self.norm = layer_norm(cfg, "layer_norm")
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, input_ids, segment_ids, position_ids, deterministic: bool):
    x = (jnp.take(self.word, input_ids, axis=0) + jnp.take(self.position, position_ids, axis=0)
         + jnp.take(self.segment, segment_ids, axis=0))
    return self.dropout(self.norm(x.astype(self.cfg.dtype)), deterministic=deterministic)

  def attend(self, x):
    """Logits against the (tied) input embedding table, in float32 for a stable loss."""
    return jnp.einsum("...h,vh->...v", x.astype(jnp.float32), self.word)


class SelfAttention(nn.Module):
  cfg: BertConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.cfg
    shape = (cfg.num_heads, cfg.head_dim)

    def proj(name):
      return nn.DenseGeneral(shape, dtype=cfg.dtype, kernel_init=_init(cfg, ("embed", "heads", "kv")),
                             bias_init=_zeros(("heads", "kv")), name=name)(x)

    q, k, v = proj("query"), proj("key"), proj("value")
    y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=cfg.attention_impl)
    y = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), dtype=cfg.dtype,
                        kernel_init=_init(cfg, ("heads", "kv", "embed")),
                        bias_init=_zeros(("embed",)), name="output")(y)
    return nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)


class EncoderLayer(nn.Module):
  """Post-LN block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

  cfg: BertConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.cfg
    x = layer_norm(cfg, "attention_norm")(x + SelfAttention(cfg, name="attention")(x, mask, deterministic))
    h = nn.gelu(dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x), approximate=False)
    h = nn.Dropout(cfg.dropout_rate)(dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h),
                                     deterministic=deterministic)
    return layer_norm(cfg, "output_norm")(x + h)


class BertEncoder(nn.Module):
  """Returns the final hidden states [B, L, H] (and the pooled [CLS] if `use_pooler`)."""

  cfg: BertConfig

  def setup(self):
    self.embeddings = Embeddings(self.cfg)
    self.layers = [EncoderLayer(self.cfg, name=f"layer_{i}") for i in range(self.cfg.num_layers)]
    if self.cfg.use_pooler:
      self.pooler = dense(self.cfg, self.cfg.hidden_size, ("embed", "embed_out"), "pooler")

  def __call__(self, input_ids, segment_ids=None, attention_mask=None, position_ids=None,
               deterministic: bool = True):
    if segment_ids is None:
      segment_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids, dtype=bool)
    # [B, 1, 1, S]: every query attends to the real (non-padding) keys of its row.
    mask = attention_mask.astype(bool)[:, None, None, :]
    x = self.embeddings(input_ids, segment_ids, position_ids, deterministic)
    for layer in self.layers:
      x = layer(x, mask, deterministic)
    if self.cfg.use_pooler:
      return x, jnp.tanh(self.pooler(x[:, 0]))
    return x
