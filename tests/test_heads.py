"""Head masking (against a NumPy reference) and the attention-pattern classifier (synthetic maps)."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanlm import heads_analysis as ha
from spanlm.models.bert import BertConfig, BertEncoder, SelfAttention

CFG = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
                 max_position_embeddings=16, dropout_rate=0.0)
B, T = 2, 7


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(5, 50, (B, T)), jnp.int32)
  valid = jnp.asarray(np.arange(T)[None, :] < np.array([[T], [5]]))
  return ids, valid


def _attention_reference(p, x, valid, keep):
  """softmax(q k^T / sqrt(d)) v per head, head h scaled by keep[h], then the output projection."""
  q, k, v = (np.einsum("btd,dhk->bthk", x, p[n]["kernel"]) + p[n]["bias"] for n in ("query", "key", "value"))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = np.where(valid[:, None, None, :], s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  ctx = np.einsum("bhqk,bkhd->bqhd", a, v) * keep[None, None, :, None]
  return np.einsum("bqhd,hdo->bqo", ctx, p["output"]["kernel"]) + p["output"]["bias"]


def test_masked_head_matches_numpy_reference(inputs):
  _, valid = inputs
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, CFG.hidden_size))
  mask = valid[:, None, None, :]
  cfg = dataclasses.replace(CFG, head_mask=("1:2",))
  params = nn.meta.unbox(SelfAttention(CFG, layer=1).init(jax.random.PRNGKey(0), x, mask, True)["params"])
  p = jax.tree.map(np.asarray, params)
  for layer, keep in ((1, np.array([1, 1, 0, 1.0])), (0, np.ones(4))):  # only layer 1's head 2 is off
    got = SelfAttention(cfg, layer=layer).apply({"params": params}, x, mask, True)
    np.testing.assert_allclose(got, _attention_reference(p, np.asarray(x), np.asarray(valid), keep),
                               rtol=1e-5, atol=1e-5)
  unmasked = SelfAttention(CFG, layer=1).apply({"params": params}, x, mask, True)
  assert np.abs(np.asarray(unmasked) - _attention_reference(p, np.asarray(x), np.asarray(valid),
                                                            np.array([1, 1, 0, 1.0]))).max() > 1e-3


@pytest.mark.slow
def test_head_mask_equals_zeroing_that_heads_output_weights(inputs):
  """Masking (layer, head) is exactly removing that head's rows of the output projection."""
  ids, valid = inputs
  model = BertEncoder(CFG)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), ids, attention_mask=valid)["params"])
  for layer, head in ((0, 1), (1, 3)):
    masked = BertEncoder(dataclasses.replace(CFG, head_mask=(f"{layer}:{head}",)))
    got = masked.apply({"params": params}, ids, attention_mask=valid)
    zeroed = ha.without_head(params, layer, head)  # what tools/ablate_heads.py uses
    assert np.all(zeroed[f"layer_{layer}"]["attention"]["output"]["kernel"][head] == 0)
    assert np.any(params[f"layer_{layer}"]["attention"]["output"]["kernel"][head] != 0)  # not in place
    np.testing.assert_allclose(got, model.apply({"params": zeroed}, ids, attention_mask=valid),
                               rtol=1e-5, atol=1e-5)
    assert np.abs(got - model.apply({"params": params}, ids, attention_mask=valid)).max() > 1e-4


@pytest.mark.parametrize("bad", [("2:0",), ("0:4",), ("zero:one",)])
def test_bad_head_mask_is_a_clear_error(bad):
  with pytest.raises(ValueError, match="head_mask entry"):
    dataclasses.replace(CFG, head_mask=bad)


def test_head_mask_from_a_config_string():
  assert dataclasses.replace(CFG, head_mask="0:1, 1:3").head_mask == ("0:1", "1:3")


# --- the pattern classifier on synthetic maps ------------------------------------------------
N = 24
SPECIAL = np.zeros(N, bool)
SPECIAL[[0, 11, N - 1]] = True  # [CLS] ... [SEP] ... [SEP]
BLOCKS = np.where(np.arange(N) <= 11, 0, 1)


def _rows(weights):
  w = np.asarray(weights, float) + 1e-3
  return w / w.sum(-1, keepdims=True)


def _synthetic(kind, rng):
  noise = rng.random((N, N)) * 0.05
  vertical = np.zeros((N, N))
  vertical[:, SPECIAL] = 1.0
  diagonal = np.eye(N, k=-1) + np.eye(N, k=1)
  block = (BLOCKS[:, None] == BLOCKS[None, :]).astype(float)
  return _rows({"vertical": vertical, "diagonal": diagonal, "vertical+diagonal": vertical + diagonal,
                "block": block, "heterogeneous": rng.random((N, N))}[kind] + noise)


@pytest.mark.parametrize("kind", ha.PATTERNS)
def test_classifier_recognises_each_synthetic_pattern(kind):
  rng = np.random.default_rng(hash(kind) % 2**32)
  for _ in range(5):
    label, features = ha.classify_map(_synthetic(kind, rng), SPECIAL, BLOCKS)
    assert label == kind, (kind, features)


def test_features_are_attention_masses():
  for k in (-1, 0, 1):  # previous token, itself, next token
    f = ha.map_features(_rows(np.eye(N, k=k)), SPECIAL, BLOCKS)
    assert f["diagonal"] > 0.9 and f["vertical"] < 0.2
  assert ha.map_features(_rows(np.eye(N, k=2)), SPECIAL, BLOCKS)["diagonal"] < 0.1
  assert 0 <= f["block"] <= 1 and abs(ha.map_features(_rows(np.ones((N, N))), SPECIAL, BLOCKS)["block_excess"]) < 1e-6


def test_attention_maps_and_report(inputs, tmp_path):
  ids, valid = inputs
  params = nn.meta.unbox(BertEncoder(CFG).init(jax.random.PRNGKey(0), ids, attention_mask=valid)["params"])
  seg = jnp.zeros_like(ids)
  probs = ha.attention_probs(CFG, params, ids, seg, valid)
  assert probs.shape == (CFG.num_layers, B, CFG.num_heads, T, T)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert np.all(probs[:, 1, :, :, 5:] < 1e-6)  # padding keys of row 1 get no attention
  special = np.zeros((B, T), bool)
  special[:, 0] = True
  result = ha.classify_heads(probs, special, np.zeros((B, T), int), np.array([T, 5]))
  assert np.shape(result["labels"]) == (CFG.num_layers, CFG.num_heads)
  summary = ha.write_report(result, probs, special, np.array([T, 5]), str(tmp_path), "tiny")
  assert abs(sum(summary["share"].values()) - 1) < 1e-9
  assert {"heads.json", "heads.md", "attention_maps.png"} <= set(os.listdir(tmp_path))


def test_uniform_ablation_gives_the_head_uniform_attention(inputs):
  """Kovaleva et al. 2019 disable a head by making its attention uniform (tools/ablate_heads.py --mode=uniform)."""
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
  import ablate_heads

  ids, valid = inputs
  params = jax.tree.map(np.asarray, nn.meta.unbox(BertEncoder(CFG).init(jax.random.PRNGKey(1), ids)["params"]))
  seg = np.zeros_like(ids)
  before = ha.attention_probs(CFG, params, ids, seg, valid.astype(np.int32))  # [L, B, H, T, T]
  after = ha.attention_probs(CFG, ablate_heads.uniform_head(params, 1, 2), ids, seg, valid.astype(np.int32))
  lengths = np.asarray(valid).sum(1)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(after[1, b, 2, :n, :n], 1.0 / n, rtol=1e-5)  # uniform over real tokens
    np.testing.assert_allclose(after[1, b, 2, :n, n:], 0.0, atol=1e-7)
  assert not np.allclose(before[1, :, 2], after[1, :, 2])
  np.testing.assert_allclose(np.delete(after[1], 2, axis=1), np.delete(before[1], 2, axis=1), rtol=1e-5)
  np.testing.assert_allclose(after[0], before[0], rtol=1e-5)  # layer 0 is upstream: untouched
