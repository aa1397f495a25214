"""The encoder and heads against NumPy implementations of the papers' equations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from spanlm.models.bert import PRESETS, BertEncoder, config_for
from spanlm.models.heads import BertForPretraining

V, L = 97, 12


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("size,expected", [("base", 109_482_240), ("large", 335_141_888)])
def test_preset_parameter_counts_match_bert(size, expected):
  # BERT-base "110M" / BERT-large "340M" (Devlin et al. 2019); exact counts of the
  # reference BertModel with pooler and the 30522-token uncased vocabulary.
  cfg = config_for(size, 30522, use_pooler=True)
  shapes = jax.eval_shape(lambda: BertEncoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  assert count(nn.meta.unbox(shapes)) == expected


def test_every_parameter_has_logical_axis_names():
  cfg = config_for("tiny", V, use_pooler=True)
  model = BertForPretraining(cfg, sbo=True)
  ids = jnp.ones((1, L), jnp.int32)
  pos = jnp.ones((1, 2), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids, ids > 0, pos, pos - 1, pos + 1))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)


def gelu(x):
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def layer_norm(x, p, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_encoder(p, ids, seg, mask, num_heads):
  """BERT's encoder written from the paper/Vaswani et al.: post-LN, scaled dot-product attention."""
  p = jax.tree.map(np.asarray, p)
  e = p["embeddings"]
  x = e["word_embeddings"][ids] + e["position_embeddings"][np.arange(ids.shape[1])] + e["token_type_embeddings"][seg]
  x = layer_norm(x, e["layer_norm"])
  i = 0
  while f"layer_{i}" in p:
    lp = p[f"layer_{i}"]
    a = lp["attention"]
    q, k, v = (np.einsum("blh,hnd->blnd", x, a[n]["kernel"]) + a[n]["bias"] for n in ("query", "key", "value"))
    scores = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None, None, :], scores, -1e30)
    ctx = np.einsum("bnqk,bknd->bqnd", softmax(scores), v)
    out = np.einsum("bqnd,ndh->bqh", ctx, a["output"]["kernel"]) + a["output"]["bias"]
    x = layer_norm(x + out, lp["attention_norm"])
    h = gelu(x @ lp["intermediate"]["kernel"] + lp["intermediate"]["bias"])
    x = layer_norm(x + h @ lp["output"]["kernel"] + lp["output"]["bias"], lp["output_norm"])
    i += 1
  return x


@pytest.fixture(scope="module")
def tiny_pretraining_model():
  cfg = config_for("tiny", V, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                   max_position_embeddings=L)
  model = BertForPretraining(cfg, sbo=True, sbo_max_targets=8)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, V, size=(3, L)).astype(np.int32)
  ids[:, 0] = 2
  ids[2, 7:] = 0  # padded row
  seg = (np.arange(L) >= 5).astype(np.int32)[None].repeat(3, 0)
  positions = np.array([[3, 4, 5], [1, 2, 9], [4, 5, 1]], np.int32)
  left, right = positions - 1, positions + 2
  args = (jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(ids != 0), jnp.asarray(positions),
          jnp.asarray(left), jnp.asarray(right))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), *args)["params"])
  # Non-trivial LayerNorm/bias parameters, so the check covers them too.
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
  return model, params, args


@pytest.mark.slow
def test_encoder_matches_numpy_reference(tiny_pretraining_model):
  model, params, (ids, seg, mask, *_) = tiny_pretraining_model
  got = BertEncoder(model.cfg).apply({"params": params["encoder"]}, ids, seg, mask)
  want = reference_encoder(params["encoder"], np.asarray(ids), np.asarray(seg), np.asarray(mask), 4)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-4, rtol=1e-4)


def test_padding_keys_are_ignored(tiny_pretraining_model):
  model, params, (ids, seg, mask, *_) = tiny_pretraining_model
  enc = BertEncoder(model.cfg)
  before = enc.apply({"params": params["encoder"]}, ids, seg, mask)
  changed = ids.at[2, 8:].set(50)  # garbage under the padding mask
  after = enc.apply({"params": params["encoder"]}, changed, seg, mask)
  np.testing.assert_allclose(np.asarray(before)[2, :7], np.asarray(after)[2, :7], atol=1e-6)


def test_heads_match_numpy_reference(tiny_pretraining_model):
  """MLM: tied decoder over Dense-GELU-LN. (SBO: tests/test_objectives.py, against SpanBERT's own head.)"""
  model, params, args = tiny_pretraining_model
  ids, seg, mask, positions, left, right = args
  out = model.apply({"params": params}, *args)
  p = jax.tree.map(np.asarray, params)
  hidden = reference_encoder(p["encoder"], np.asarray(ids), np.asarray(seg), np.asarray(mask), 4)
  table = p["encoder"]["embeddings"]["word_embeddings"]
  take = lambda idx: np.take_along_axis(hidden, np.asarray(idx)[..., None], axis=1)
  t = p["mlm_transform"]
  h = layer_norm(gelu(take(positions) @ t["dense"]["kernel"] + t["dense"]["bias"]), t["norm"])
  np.testing.assert_allclose(out["mlm_logits"], h @ table.T + p["mlm_bias"], atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_params():
  cfg = config_for("tiny", V, dtype=jnp.bfloat16)
  ids = jnp.ones((2, 8), jnp.int32)
  variables = BertEncoder(cfg).init(jax.random.PRNGKey(0), ids)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(variables)))
  assert BertEncoder(cfg).apply(variables, ids).dtype == jnp.bfloat16


def test_presets_and_bad_sizes():
  assert set(PRESETS) >= {"tiny", "mini", "small", "base", "large"}
  with pytest.raises(ValueError, match="unknown model size"):
    config_for("gigantic", V)
  with pytest.raises(ValueError, match="not divisible"):
    config_for("tiny", V, num_heads=3)
