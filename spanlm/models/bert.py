"""BERT encoder (Devlin et al. 2019) in flax.linen.

Post-LayerNorm Transformer encoder with token, position and segment embeddings
and exact (erf) GELU, as in the original BERT. Every parameter carries logical
axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `pos`, `type`); the mapping
to mesh axes lives in `spanlm.parallel`, so the model never names a device.

Attention runs on the backend's fused kernel (`spanlm.models.attention`: cuDNN on
GPU, Pallas splash on TPU, XLA elsewhere; `attention_impl`). BERT's dropout on
attention probabilities (= `dropout_rate`) is applied on the XLA path only: the
kernels have none (docs/performance.md). Parameters are float32; `dtype` sets
the compute dtype (bf16 for speed).

Layers are scanned (`nn.scan`, one compiled layer body, parameters stacked on a
leading `layers` axis under `encoder/layers`) when `scan_layers` (default: from
SCAN_MIN_LAYERS layers up), else unrolled as `encoder/layer_0 ...`. The two
layouts hold the same numbers; `to_layout` converts either way (checkpoints,
HF weights and sown collections are converted on load).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spanlm.models import attention as attn_lib
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

# Scanning compiles one layer body instead of num_layers copies (compile time and HLO size flat in
# depth: docs/performance.md); below this depth unrolled layers compile about as fast.
SCAN_MIN_LAYERS = 6
LAYERS_AXIS = "layers"  # logical name of the stacked parameters' leading axis (replicated)


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
  attention_impl: str | None = None  # None/'auto' (per backend), 'xla', 'cudnn' or 'splash'
  scan_layers: bool | None = None  # nn.scan over layers; None = from SCAN_MIN_LAYERS layers up
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
    attn_lib.resolve(self.attention_impl, self.dtype, platform="cpu")  # validates the name
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

  @property
  def scanned(self) -> bool:
    """Layers run under nn.scan (parameters stacked on a leading `layers` axis)."""
    if self.scan_layers is None:
      return self.num_layers >= SCAN_MIN_LAYERS
    return bool(self.scan_layers)

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
  """Multi-head self-attention. `mask` is (valid [B, S], packing_ids [B, S] or None), or a dense
  boolean [B, 1, T|1, S] mask (always the XLA path). `keep` [heads] multiplies each head's context
  (head masking); None = `head_keep(cfg, layer)`.

  apply(..., mutable=['attentions']) sows, per layer, `scores` (pre-softmax q k^T / sqrt(d), fp32:
  TinyBERT's attention loss) and `probs` (softmax: head analysis), each [B, heads, T, S]; the
  fused kernels hide both, so capturing runs the XLA path.
  """

  cfg: BertConfig
  layer: int = -1  # index in the encoder, for cfg.head_mask (-1: shared across layers)

  @nn.compact
  def __call__(self, x, mask, deterministic: bool, keep=None):
    cfg = self.cfg
    shape = (cfg.num_heads, cfg.head_dim)

    def proj(name):
      return nn.DenseGeneral(shape, dtype=cfg.dtype, kernel_init=_init(cfg, ("embed", "heads", "kv")),
                             bias_init=_zeros(("heads", "kv")), name=name)(x)

    q, k, v = proj("query"), proj("key"), proj("value")
    dense = not isinstance(mask, tuple)
    capture = self.is_mutable_collection("attentions") and not self.is_initializing()  # init: all mutable
    impl = "xla" if dense or capture else attn_lib.resolve(cfg.attention_impl, cfg.dtype)
    if impl == "xla":
      full = mask if dense else attn_lib.dense_mask(*mask)
      drop = not deterministic and cfg.dropout_rate > 0
      y, scores, probs = attn_lib.xla_attention(
          q, k, v, full, dropout_rate=cfg.dropout_rate,
          dropout_rng=self.make_rng("dropout") if drop else None, deterministic=not drop)
      if capture:
        self.sow("attentions", "scores", scores)
        self.sow("attentions", "probs", probs)
    else:
      y = attn_lib.attention(q, k, v, *mask, impl=impl)
    if keep is None and self.layer >= 0:
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
  """Post-LN block: x = LN(x + Attn(x)); x = LN(x + FFN(x)).

  ALBERT share_layers='attention'|'ffn': unrolled, the encoder's one shared module is passed in as
  `shared_attention` / `shared_ffn`; scanned, its parameters come as the `shared` argument (broadcast
  to every step of the scan, so they stay one set outside the stacked `layers`)."""

  cfg: BertConfig
  shared_attention: Any = None  # ALBERT share_layers='attention': the encoder's one SelfAttention
  shared_ffn: Any = None  # ... 'ffn': the encoder's one FeedForward
  layer: int = -1  # index in the encoder (for cfg.head_mask)

  def _apply_shared(self, module, shared, *args, deterministic: bool):
    """The shared sub-block with parameters `shared`, inside the scanned body (own dropout key)."""
    if self.cfg.share_layers == "attention" and self.is_mutable_collection("attentions") \
        and not self.is_initializing():
      raise NotImplementedError("capturing attentions with share_layers='attention' and scanned layers; "
                                "set scan_layers=False")
    drop = not deterministic and self.cfg.dropout_rate > 0
    return module.apply({"params": shared}, *args, deterministic=deterministic,
                        rngs={"dropout": self.make_rng("dropout")} if drop else {})

  @nn.compact
  def __call__(self, x, mask, deterministic: bool, keep=None, shared=None):
    cfg = self.cfg
    if shared is not None and cfg.share_layers == "attention":
      a = self._apply_shared(SelfAttention(cfg, parent=None), shared, x, mask, deterministic=deterministic)
    else:
      attention = (self.shared_attention if self.shared_attention is not None
                   else SelfAttention(cfg, layer=self.layer, name="attention"))
      a = attention(x, mask, deterministic, keep)
    x = layer_norm(cfg, "attention_norm")(x + a)
    if shared is not None and cfg.share_layers == "ffn":
      h = self._apply_shared(FeedForward(cfg, parent=None), shared, x, deterministic=deterministic)
      return layer_norm(cfg, "output_norm")(x + h)
    if self.shared_ffn is not None:
      return layer_norm(cfg, "output_norm")(x + self.shared_ffn(x, deterministic))
    h = nn.gelu(dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x), approximate=False)
    h = nn.Dropout(cfg.dropout_rate)(dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h),
                                     deterministic=deterministic)
    return layer_norm(cfg, "output_norm")(x + h)


def head_keeps(cfg: BertConfig):
  """[num_layers, num_heads] head multipliers (the scanned input of head masking), or None."""
  if not cfg.head_mask:
    return None
  ones = np.ones(cfg.num_heads, np.float32)
  return np.stack([k if (k := head_keep(cfg, l)) is not None else ones for l in range(cfg.num_layers)])


def _scan_step(layer, x, keep, mask, deterministic, shared):
  return layer(x, mask, deterministic, keep, shared), None


class BertEncoder(nn.Module):
  """Returns the final hidden states [B, L, H] (and the pooled [CLS] if `use_pooler`)."""

  cfg: BertConfig

  def setup(self):
    cfg = self.cfg
    self.embeddings = Embeddings(cfg)
    layer = EncoderLayer
    if cfg.remat != "none":  # `deterministic` (argument 3, counting self) is a Python bool: static
      layer = nn.remat(EncoderLayer, policy=REMAT_POLICIES[cfg.remat], static_argnums=(3,),
                       prevent_cse=not cfg.scanned)  # scan already keeps XLA from CSE-ing it away
    share = cfg.share_layers
    shared = {}
    if share == "attention":
      shared["shared_attention"] = SelfAttention(cfg, name="shared_attention")
    if share == "ffn":
      shared["shared_ffn"] = FeedForward(cfg, name="shared_ffn")
    if cfg.scanned:
      # 'all': one parameter set broadcast to every step (same layout as unrolled: layer_shared);
      # else parameters (and sown collections) stacked along a leading `layers` axis, and the
      # shared sub-block ('attention'|'ffn') kept once, as unrolled, its parameters broadcast.
      self.scanned_layer = layer(cfg, name="layer_shared" if share == "all" else "layers")
      self.shared_block = next(iter(shared.values()), None)
    elif share == "all":  # ALBERT: one set of layer parameters, applied num_layers times
      self.layers = [layer(cfg, name="layer_shared")] * cfg.num_layers
    else:
      self.layers = [layer(cfg, name=f"layer_{i}", layer=i, **shared) for i in range(cfg.num_layers)]
    if cfg.use_pooler:
      self.pooler = dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "pooler")

  def _run_scanned(self, x, mask, deterministic):
    cfg = self.cfg
    stacked = cfg.share_layers != "all"
    axes = {"attentions": 0, "intermediates": 0}
    if stacked:
      axes["params"] = 0
    scan = nn.scan(_scan_step, variable_axes=axes,
                   variable_broadcast=False if stacked else "params",
                   split_rngs={"params": stacked, "dropout": True},
                   in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
    keeps = head_keeps(cfg)
    shared = None
    if self.shared_block is not None:  # ALBERT attention|ffn: one parameter set, outside the scan
      if self.is_initializing():  # creates its parameters
        if cfg.share_layers == "attention":
          self.shared_block(x, mask, True)
        else:
          self.shared_block(x, True)
      shared = self.shared_block.variables["params"]
    x, _ = scan(self.scanned_layer, x, None if keeps is None else jnp.asarray(keeps), mask, deterministic, shared)
    return x

  def __call__(self, input_ids, segment_ids=None, attention_mask=None, position_ids=None,
               deterministic: bool = True, packing_ids=None):
    """`packing_ids` [B, L] (packed rows): tokens attend only within their own document."""
    if segment_ids is None:
      segment_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids, dtype=bool)
    # Every query attends to the real (non-padding) keys of its row and, when packed, of its own
    # document: each attention backend builds that mask its own way (models/attention.py).
    mask = (attention_mask.astype(bool), packing_ids)
    x = self.embeddings(input_ids, segment_ids, position_ids, deterministic)
    x = constrain(x, ACTIVATION_AXES)
    if self.cfg.scanned:
      x = constrain(self._run_scanned(x, mask, deterministic), ACTIVATION_AXES)
    else:
      for layer in self.layers:
        x = constrain(layer(x, mask, deterministic), ACTIVATION_AXES)
    if self.cfg.use_pooler:
      return x, jnp.tanh(self.pooler(x[:, 0]))
    return x


# --- the two parameter layouts -------------------------------------------------------------------
def _layer_keys(tree: dict) -> list[str]:
  n = 0
  while f"layer_{n}" in tree:
    n += 1
  return [f"layer_{i}" for i in range(n)]


def _stack(*xs):
  x = xs[0]
  if isinstance(x, jax.ShapeDtypeStruct):  # an abstract restore target: the stacked axis is replicated
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(xs),) + tuple(x.shape), x.dtype, sharding=sharding)
  return np.stack([np.asarray(v) for v in xs]) if isinstance(x, np.ndarray) else jnp.stack(xs)


def _index(x, i):
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=sharding)
  return x[i]


def stack_layers(tree):
  """Unrolled -> scanned: `layer_0 ... layer_{n-1}` become `layers` with each leaf stacked on a
  new leading axis. Works on params, optimizer moments, sown collections or abstract
  (ShapeDtypeStruct) trees alike; a tree without `layer_0` is returned as is."""
  if not isinstance(tree, dict) or "layer_0" not in tree:
    return tree
  keys = _layer_keys(tree)
  out = {k: v for k, v in tree.items() if k not in keys}
  out["layers"] = jax.tree.map(_stack, *[tree[k] for k in keys])
  return out


def unstack_layers(tree):
  """Scanned -> unrolled: `layers` (leaves [n, ...]) becomes `layer_0 ... layer_{n-1}`."""
  if not isinstance(tree, dict) or "layers" not in tree:
    return tree
  n = jax.tree.leaves(tree["layers"])[0].shape[0]
  out = {k: v for k, v in tree.items() if k != "layers"}
  for i in range(n):
    out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: _index(x, i), tree["layers"])
  return out


def to_layout(encoder_tree, scanned: bool):
  """Encoder params (or a sown collection) in the scanned (True) or unrolled (False) layout."""
  return stack_layers(encoder_tree) if scanned else unstack_layers(encoder_tree)


def convert_encoders(tree, scanned: bool):
  """Every `encoder` subtree anywhere in `tree` (a TrainState: params and each optimizer moment)
  in the scanned or unrolled layout: how a checkpoint written in the other layout is restored."""
  if isinstance(tree, dict):
    return {k: to_layout(v, scanned) if k == "encoder" and isinstance(v, dict) else convert_encoders(v, scanned)
            for k, v in tree.items()}
  if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
    return dataclasses.replace(tree, **{f.name: convert_encoders(getattr(tree, f.name), scanned)
                                        for f in dataclasses.fields(tree) if f.init})
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple optimizer states
    return type(tree)(*(convert_encoders(v, scanned) for v in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(convert_encoders(v, scanned) for v in tree)
  return tree
