"""Attention backends (spanlm/models/attention.py) against the XLA path and a NumPy reference.

The mask every backend must implement: key j is a real token and, in a packed row, in query i's
document. Kernels may differ at padding queries (no loss reads them), so outputs and gradients
are compared at real positions only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanlm.models import attention as A

B, T, H, D = 2, 128, 2, 32


@pytest.fixture(scope="module")
def qkv():
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.normal(size=(B, T, H, D)), jnp.float32) for _ in range(3))
  valid = jnp.asarray(np.arange(T)[None] < np.array([[T], [100]]))  # row 1: 28 padding tokens
  packing = jnp.asarray(np.stack([np.repeat(np.arange(4), 32),  # 4 documents of 32
                                  np.r_[np.zeros(50), np.ones(50), np.full(28, 2)]]).astype(np.int32))
  return q, k, v, valid, packing


def _reference(q, k, v, valid, packing):
  """softmax(q k^T / sqrt(d)) v per head, key j allowed iff real and in i's document."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  allowed = np.asarray(valid)[:, None, None, :]
  if packing is not None:
    p = np.asarray(packing)
    allowed = allowed & (p[:, None, :, None] == p[:, None, None, :])
  s = np.where(allowed, s, -1e30)
  a = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", a / a.sum(-1, keepdims=True), v)


def _real(x, valid):
  return np.where(np.asarray(valid)[:, :, None, None], np.asarray(x, np.float32), 0.0)


def test_auto_picks_the_backend_kernel():
  assert A.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert A.resolve("", jnp.float32, "gpu") == "xla"  # cuDNN flash attention has no fp32
  assert A.resolve(None, jnp.float32, "tpu") == "splash"
  assert A.resolve("auto", jnp.bfloat16, "cpu") == "xla"
  assert A.resolve("splash", jnp.float32, "cpu") == "splash"  # explicit choice wins
  with pytest.raises(ValueError, match="choose one of"):
    A.resolve("flash", jnp.float32, "cpu")


@pytest.mark.parametrize("packed", [False, True], ids=["padding", "packed"])
def test_xla_path_matches_numpy_reference(qkv, packed):
  q, k, v, valid, packing = qkv
  p = packing if packed else None
  y = A.xla_attention(q, k, v, A.dense_mask(valid, p))[0]
  np.testing.assert_allclose(_real(y, valid), _real(_reference(q, k, v, valid, p), valid), atol=2e-5)


def test_padding_as_sequence_lengths_equals_the_mask(qkv):
  """The cuDNN path's convention (padding = per-row lengths, jax.nn.dot_product_attention's
  query/key_value_seq_lengths), checked on CPU through that function's XLA implementation."""
  q, k, v, valid, _ = qkv
  lengths = jnp.sum(valid.astype(jnp.int32), -1)
  y = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                   implementation="xla")
  ref = A.xla_attention(q, k, v, A.dense_mask(valid))[0]
  np.testing.assert_allclose(_real(y, valid), _real(ref, valid), atol=1e-5)


def test_packed_segments_give_cudnn_lengths_and_offsets(qkv):
  _, _, _, valid, packing = qkv
  lengths, offsets = jax.jit(A.packed_segments, static_argnums=1)(A.segment_ids(valid, packing), 5)
  np.testing.assert_array_equal(lengths, [[32, 32, 32, 32, -1], [50, 50, -1, -1, -1]])
  np.testing.assert_array_equal(offsets, [[0, 32, 64, 96, -1, -1], [0, 50, -1, -1, -1, -1]])
  seg = A.segment_ids(valid, packing)
  assert int(seg[1, 99]) == 2 and int(seg[1, 100]) == 0  # padding is segment 0


def test_attention_dropout_drops_probabilities_at_the_rate(qkv):
  """BERT's attention-probability dropout: with v one-hot over keys, the output rows are the
  dropped probabilities: zero at rate p, the rest scaled by 1/(1-p); deterministic = the probs."""
  q, k, _, valid, _ = qkv
  v = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (B, T, H, T))  # d = T: y[b,i,h,j] = P_hij
  mask = A.dense_mask(valid)
  y, _, probs = A.xla_attention(q, k, v, mask, dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0),
                                deterministic=False)
  probs = np.asarray(probs).transpose(0, 2, 1, 3)  # [B, T, H, S] like y
  y = np.asarray(y)
  live = probs > 1e-12
  dropped = (y == 0) & live
  assert abs(dropped[live].mean() - 0.1) < 0.01
  np.testing.assert_allclose(y[live & ~dropped], probs[live & ~dropped] / 0.9, rtol=1e-5)
  same = A.xla_attention(q, k, v, mask, dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0))[0]
  np.testing.assert_allclose(np.asarray(same), probs, rtol=1e-5, atol=1e-7)


def _compare_with_xla(kernel, q, k, v, valid, packing, atol):
  def loss(f):
    return lambda q, k, v: jnp.sum(jnp.where(valid[:, :, None, None], f(q, k, v), 0.0).astype(jnp.float32) ** 2)
  mask = A.dense_mask(valid, packing)
  y_k = jax.jit(lambda q, k, v: kernel(q, k, v, valid, packing))(q, k, v)
  y_x = A.xla_attention(q, k, v, mask)[0]
  np.testing.assert_allclose(_real(y_k, valid), _real(y_x, valid), atol=atol)
  g_k = jax.jit(jax.grad(loss(lambda q, k, v: kernel(q, k, v, valid, packing)), argnums=(0, 1, 2)))(q, k, v)
  g_x = jax.jit(jax.grad(loss(lambda q, k, v: A.xla_attention(q, k, v, mask)[0]), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_k, g_x):  # gradients at padding keys/queries are zero on both sides
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= atol * (1 + np.abs(b).max()), np.abs(a - b).max()


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padding", "packed"])
def test_splash_kernel_in_interpret_mode_matches_xla(qkv, packed):
  """Pallas splash attention (the TPU kernel) run by the Pallas interpreter on CPU."""
  q, k, v, valid, packing = qkv
  kernel = lambda q, k, v, valid, p: A.splash_attention(q, k, v, valid, p, block=128, interpret=True)
  _compare_with_xla(kernel, q, k, v, valid, packing if packed else None, atol=1e-5)


def test_splash_refuses_lengths_its_blocks_do_not_divide(qkv):
  q, k, v, valid, _ = qkv
  with pytest.raises(ValueError, match="multiple of 128"):
    A.splash_attention(q[:, :96], k[:, :96], v[:, :96], valid[:, :96], interpret=True)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("packed", [False, True], ids=["padding", "packed"])
def test_cudnn_kernel_matches_xla(qkv, packed):
  q, k, v, valid, packing = qkv
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  _compare_with_xla(A.cudnn_attention, q, k, v, valid, packing if packed else None, atol=2e-2)


@pytest.mark.slow
def test_encoder_on_the_splash_kernel_equals_the_xla_encoder(qkv):
  """The encoder hands padding and packed documents to the kernel (as segment ids) correctly."""
  import dataclasses

  import flax.linen as nn

  from spanlm.models.bert import BertConfig, BertEncoder
  _, _, _, valid, packing = qkv
  cfg = BertConfig(vocab_size=50, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32,
                   max_position_embeddings=T, attention_impl="xla")
  ids = jnp.asarray(np.random.default_rng(1).integers(5, 50, (B, T)), jnp.int32)
  params = nn.meta.unbox(jax.jit(BertEncoder(cfg).init)(jax.random.PRNGKey(0), ids)["params"])
  run = lambda c: jax.jit(lambda p: BertEncoder(c).apply({"params": p}, ids, attention_mask=valid,
                                                         packing_ids=packing))(params)
  x_xla, x_splash = run(cfg), run(dataclasses.replace(cfg, attention_impl="splash"))
  np.testing.assert_allclose(_real(x_splash[:, :, None, :], valid), _real(x_xla[:, :, None, :], valid), atol=1e-5)
