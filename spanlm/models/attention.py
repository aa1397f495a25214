"""Scaled dot-product attention, one function per backend, chosen by `attention_impl`.

  xla     softmax(q k^T / sqrt(d) masked) v written out: fp32 logits and softmax, [B, heads, T, S]
          in memory; attention-probability dropout (BERT: 0.1) applied here, as in BERT.
  cudnn   cuDNN flash attention (GPU, bf16/fp16 only): padding as sequence lengths
          (`jax.nn.dot_product_attention(query_seq_lengths=...)`); packed rows as cuDNN's packed
          layout, each document a segment given by its length and offset (the kernel behind
          `jax.nn.dot_product_attention`, which takes no segment ids itself). No dropout.
  splash  Pallas splash attention (TPU, `jax.experimental.pallas.ops.tpu.splash_attention`):
          padding and packed documents as segment ids. No dropout (the kernel has none).
  auto    cudnn on GPU in bf16/fp16, splash on TPU, xla elsewhere (and for fp32 on GPU).

The mask every backend implements is the one the XLA path writes out: query i attends to key j
iff j is a real token (attention_mask) and, in a packed row, i and j belong to the same
document (`packing_ids`). Kernels treat padding as a segment of its own, so they differ from
XLA only at padding queries, whose outputs no loss reads (tests/test_attention.py compares the
real positions, outputs and gradients).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "xla", "cudnn", "splash")


def resolve(impl: str | None, dtype, platform: str | None = None) -> str:
  """The concrete backend for `impl` ('' / None = auto) on `platform` (default: JAX's)."""
  impl = impl or "auto"
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r}; choose one of {', '.join(IMPLS)}")
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  if platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  if platform == "tpu":
    return "splash"
  return "xla"


def dense_mask(valid, packing_ids=None):
  """Boolean [B, 1, T, S]: key j real and, when packed, in query i's document."""
  mask = valid.astype(bool)[:, None, None, :]
  if packing_ids is not None:
    mask = mask & (packing_ids[:, None, :, None] == packing_ids[:, None, None, :])
  return mask


def segment_ids(valid, packing_ids=None):
  """int32 [B, S]: 0 at padding, the document's packing id + 1 at real tokens (1 when unpacked)."""
  doc = jnp.ones_like(valid, jnp.int32) if packing_ids is None else packing_ids.astype(jnp.int32) + 1
  return jnp.where(valid.astype(bool), doc, 0)


def xla_attention(q, k, v, mask, *, dropout_rate=0.0, dropout_rng=None, deterministic=True):
  """(output [B, T, heads, d], scores [B, heads, T, S] pre-softmax, probs) with fp32 softmax."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores / np.sqrt(q.shape[-1]).astype(np.float32)
  probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
  dropped = probs
  if not deterministic and dropout_rate > 0:  # BERT drops attention probabilities (rate 0.1)
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    dropped = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  y = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v.dtype), v)
  return y, scores, probs


def packed_segments(seg, max_segments: int):
  """cuDNN's packed layout from segment ids [B, S] (contiguous runs, 0 = padding at the end):
  (lengths [B, M], offsets [B, M + 1]), unused entries -1, M = max_segments."""
  prev = jnp.pad(seg, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  starts = (seg != prev) & (seg > 0)

  def one(start_row, seg_row):
    (idx,) = jnp.nonzero(start_row, size=max_segments, fill_value=-1)
    ends = jnp.concatenate([idx[1:], jnp.array([-1])])
    real_end = jnp.sum(seg_row > 0)
    ends = jnp.where((ends < 0) & (idx >= 0), real_end, ends)
    lengths = jnp.where(idx >= 0, ends - idx, -1)
    offsets = jnp.concatenate([idx, jnp.array([-1])])  # starts only (cuDNN's docstring example)
    return lengths.astype(jnp.int32), offsets.astype(jnp.int32)

  return jax.vmap(one)(starts, seg)


def cudnn_attention(q, k, v, valid, packing_ids=None):
  """cuDNN flash attention; padding as lengths, packed documents as cuDNN packed segments."""
  lengths = jnp.sum(valid.astype(jnp.int32), axis=-1)
  if packing_ids is None:
    return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation="cudnn")
  from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

  seg_len, offsets = packed_segments(segment_ids(valid, packing_ids), max_segments=q.shape[1] // 2)
  return dot_product_attention(q, k, v, q_seqlen=seg_len, kv_seqlen=seg_len, q_offsets=offsets,
                               kv_offsets=offsets, scale=1.0 / float(np.sqrt(q.shape[-1])),
                               mask_type=MaskType.PADDING)


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, seq_len: int, block: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  mask = splash.MultiHeadMask([splash.FullMask((seq_len, seq_len)) for _ in range(num_heads)])
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():  # the cached kernel's mask tables must be concrete, not
    # tracers of whichever jit first built it
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def splash_attention(q, k, v, valid, packing_ids=None, *, block: int = 512, interpret: bool = False):
  """Pallas splash attention (TPU; `interpret=True` runs it on CPU for tests), segment ids."""
  B, T, H, d = q.shape
  block = min(block, T)
  if T % block or T % 128:
    raise ValueError(f"splash attention needs a sequence length that is a multiple of 128 (and of its "
                     f"block {block}), got {T}; use --config.model.attention_impl=xla for this length")
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  kernel = _splash_kernel(H, T, block, interpret)
  seg = segment_ids(valid, packing_ids)
  q = q / jnp.sqrt(jnp.asarray(d, q.dtype))  # the kernel does not scale

  def one(q1, k1, v1, s1):  # kernel layout: [heads, T, d]
    out = kernel(q1.swapaxes(0, 1), k1.swapaxes(0, 1), v1.swapaxes(0, 1),
                 segment_ids=splash.SegmentIds(q=s1, kv=s1))
    return out.swapaxes(0, 1)

  return jax.vmap(one)(q, k, v, seg).astype(v.dtype)


def attention(q, k, v, valid, packing_ids=None, *, impl: str, dropout_rate: float = 0.0,
              dropout_rng=None, deterministic: bool = True):
  """[B, T, heads, d] by the resolved backend `impl` (xla | cudnn | splash)."""
  if impl == "xla":
    return xla_attention(q, k, v, dense_mask(valid, packing_ids), dropout_rate=dropout_rate,
                         dropout_rng=dropout_rng, deterministic=deterministic)[0]
  if impl == "cudnn":
    return cudnn_attention(q, k, v, valid, packing_ids)
  if impl == "splash":
    return splash_attention(q, k, v, valid, packing_ids, interpret=jax.default_backend() != "tpu")
  raise ValueError(f"attention impl {impl!r} is not resolved; call attention.resolve first")
