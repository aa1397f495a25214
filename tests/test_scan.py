"""Scanned layers (nn.scan) against the unrolled encoder: same parameters, same numbers."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanlm import convert, heads_analysis
from spanlm.models.bert import BertConfig, BertEncoder, stack_layers, to_layout, unstack_layers

CFG = BertConfig(vocab_size=61, num_layers=3, hidden_size=16, num_heads=2, intermediate_size=32,
                 max_position_embeddings=16, dropout_rate=0.1, use_pooler=True, scan_layers=True)
B, T = 2, 9


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(5, 61, (B, T)), jnp.int32)
  valid = jnp.asarray(np.arange(T)[None] < np.array([[T], [6]]))
  scanned = nn.meta.unbox(jax.jit(BertEncoder(CFG).init)(jax.random.PRNGKey(0), ids, attention_mask=valid)["params"])
  return ids, valid, scanned


def _loss(cfg, ids, valid, deterministic=True):
  def f(params):
    x, pooled = BertEncoder(cfg).apply({"params": params}, ids, attention_mask=valid,
                                       deterministic=deterministic, rngs={"dropout": jax.random.PRNGKey(3)})
    return jnp.sum(jnp.where(valid[..., None], x, 0.0) ** 2) + jnp.sum(pooled)
  return f


def _vg(f):
  return jax.jit(jax.value_and_grad(f))


def test_layouts_hold_the_same_numbers(setup):
  _, _, scanned = setup
  assert scanned["layers"]["attention"]["query"]["kernel"].shape == (3, 16, 2, 8)
  unrolled = unstack_layers(scanned)
  assert sorted(k for k in unrolled if k.startswith("layer")) == ["layer_0", "layer_1", "layer_2"]
  np.testing.assert_array_equal(unrolled["layer_2"]["output"]["kernel"], scanned["layers"]["output"]["kernel"][2])
  back = stack_layers(jax.tree.map(np.asarray, unrolled))
  assert jax.tree.structure(back) == jax.tree.structure(scanned)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(scanned)))
  assert to_layout(scanned, True) is scanned  # already in that layout: untouched


@pytest.mark.parametrize("overrides", [{}, pytest.param({"remat": "full", "head_mask": ("0:1", "2:0")},
                                                        marks=pytest.mark.slow)],
                         ids=["plain", "remat+head_mask"])
def test_scanned_equals_unrolled_forward_and_gradients(setup, overrides):
  ids, valid, scanned = setup
  cfg = dataclasses.replace(CFG, **overrides)
  unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
  unrolled = unstack_layers(scanned)
  loss_s, grad_s = _vg(_loss(cfg, ids, valid))(scanned)
  loss_u, grad_u = _vg(_loss(unrolled_cfg, ids, valid))(unrolled)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(unstack_layers(grad_s)), jax.tree.leaves(grad_u)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)
  if overrides.get("head_mask"):  # layer 0 head 1 is off: its value projection gets no gradient
    assert np.all(np.asarray(grad_s["layers"]["attention"]["value"]["kernel"][0, :, 1]) == 0)
    assert np.any(np.asarray(grad_s["layers"]["attention"]["value"]["kernel"][1, :, 1]) != 0)


def test_scanned_layers_draw_their_own_dropout_masks(setup):
  """split_rngs: each scanned layer gets its own dropout key. The attention output's dropout mask
  (zeros of Dropout's output where its input was non-zero) differs between layers, at rate ~0.1."""
  ids, valid, scanned = setup
  _, sown = jax.jit(lambda p: BertEncoder(CFG).apply(
      {"params": p}, ids, attention_mask=valid, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)},
      capture_intermediates=True, mutable=["intermediates"]))(scanned)
  attn = sown["intermediates"]["layers"]["attention"]
  before, after = np.asarray(attn["output"]["__call__"][0]), np.asarray(attn["Dropout_0"]["__call__"][0])
  dropped = (after == 0) & (before != 0)  # [layers, B, T, H]
  assert dropped.shape == (3, B, T, 16)
  assert 0.05 < dropped.mean() < 0.15
  assert (dropped[0] != dropped[1]).any() and (dropped[1] != dropped[2]).any()


@pytest.mark.slow
def test_albert_all_shared_scans_with_one_parameter_set(setup):
  ids, valid, _ = setup
  cfg = dataclasses.replace(CFG, share_layers="all")
  params = nn.meta.unbox(jax.jit(BertEncoder(cfg).init)(jax.random.PRNGKey(0), ids, attention_mask=valid)["params"])
  assert "layer_shared" in params and params["layer_shared"]["output"]["kernel"].shape == (32, 16)
  loss_s, grad_s = _vg(_loss(cfg, ids, valid))(params)
  loss_u, grad_u = _vg(_loss(dataclasses.replace(cfg, scan_layers=False), ids, valid))(params)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grad_s), jax.tree.leaves(grad_u)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("share", ["attention", "ffn"])
def test_albert_partly_shared_scans_with_the_shared_block_outside(setup, share):
  """ALBERT share_layers=attention|ffn under scan: the shared sub-block keeps one parameter set
  (as unrolled), the rest is stacked; outputs and gradients equal the unrolled model's, and the
  shared block's gradient sums every layer's use of it."""
  ids, valid, _ = setup
  cfg = dataclasses.replace(CFG, share_layers=share, remat="full" if share == "ffn" else "none")
  block = f"shared_{share}"
  params = nn.meta.unbox(jax.jit(BertEncoder(cfg).init)(jax.random.PRNGKey(0), ids, attention_mask=valid)["params"])
  assert params[block]["output"]["kernel"].shape == ((32, 16) if share == "ffn" else (2, 8, 16))
  assert params["layers"]["attention_norm"]["scale"].shape == (3, 16)
  assert ("attention" in params["layers"]) == (share == "ffn")
  unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
  unrolled = unstack_layers(params)
  abstract = jax.eval_shape(BertEncoder(unrolled_cfg).init, jax.random.PRNGKey(0), ids)["params"]
  assert jax.tree.structure(nn.meta.unbox(abstract)) == jax.tree.structure(unrolled)
  loss_s, grad_s = _vg(_loss(cfg, ids, valid))(params)
  loss_u, grad_u = _vg(_loss(unrolled_cfg, ids, valid))(unrolled)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(unstack_layers(grad_s)), jax.tree.leaves(grad_u)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)
  assert np.abs(np.asarray(grad_s[block]["output"]["kernel"])).max() > 0
  # Dropout inside the shared block draws a different mask per scanned layer: the output changes
  # with the dropout key, and training mode differs from inference.
  drop = jax.jit(lambda p, k: BertEncoder(cfg).apply({"params": p}, ids, attention_mask=valid, deterministic=False,
                                                     rngs={"dropout": k})[0])
  assert not np.allclose(drop(params, jax.random.PRNGKey(1)), drop(params, jax.random.PRNGKey(2)))
  assert BertConfig(vocab_size=8, num_layers=12, hidden_size=8, num_heads=2, share_layers=share).scanned
  if share == "attention":  # the shared block runs outside flax's scan bookkeeping: no sown maps
    with pytest.raises(NotImplementedError, match="set scan_layers=False"):
      BertEncoder(cfg).apply({"params": params}, ids, attention_mask=valid, mutable=["attentions"])


def test_scanned_capture_stacks_scores_and_probs_per_layer(setup):
  """apply(mutable=['attentions']) under scan: scores and probs [layers, B, heads, T, S], equal to
  the unrolled model's per-layer captures; probs = masked softmax(scores)."""
  ids, valid, scanned = setup
  _, sown = jax.jit(lambda p: BertEncoder(CFG).apply({"params": p}, ids, attention_mask=valid,
                                                     mutable=["attentions"]))(scanned)
  got = sown["attentions"]["layers"]["attention"]
  assert got["scores"][0].shape == got["probs"][0].shape == (3, B, 2, T, T)
  ucfg = dataclasses.replace(CFG, scan_layers=False)
  _, usown = jax.jit(lambda p: BertEncoder(ucfg).apply({"params": p}, ids, attention_mask=valid,
                                                      mutable=["attentions"]))(unstack_layers(scanned))
  per_layer = unstack_layers(sown["attentions"])
  for i in range(3):
    for name in ("scores", "probs"):
      np.testing.assert_allclose(per_layer[f"layer_{i}"]["attention"][name][0],
                                 usown["attentions"][f"layer_{i}"]["attention"][name][0], rtol=1e-5, atol=1e-6)
  s = np.where(np.asarray(valid)[:, None, None, :], np.asarray(got["scores"][0], np.float64), -np.inf)
  ref = np.exp(s - s.max(-1, keepdims=True))
  np.testing.assert_allclose(got["probs"][0], ref / ref.sum(-1, keepdims=True), atol=1e-6)


def test_attention_probs_and_head_ablation_accept_either_layout(setup):
  ids, valid, scanned = setup
  seg = jnp.zeros_like(ids)
  a = heads_analysis.attention_probs(CFG, scanned, ids, seg, valid)
  b = heads_analysis.attention_probs(CFG, unstack_layers(scanned), ids, seg, valid)
  assert a.shape == (3, B, 2, T, T)
  np.testing.assert_allclose(a, b, atol=1e-6)
  ablated_s = heads_analysis.without_head(jax.tree.map(np.asarray, scanned), 2, 1)
  ablated_u = heads_analysis.without_head(jax.tree.map(np.asarray, unstack_layers(scanned)), 2, 1)
  for x, y in zip(jax.tree.leaves(unstack_layers(ablated_s)), jax.tree.leaves(ablated_u)):
    np.testing.assert_array_equal(x, y)
  assert np.all(ablated_s["layers"]["attention"]["output"]["kernel"][2, 1] == 0)
  assert np.any(np.asarray(scanned["layers"]["attention"]["output"]["kernel"][2, 1]) != 0)


@pytest.mark.slow
def test_hf_round_trip_through_the_scanned_layout(setup):
  """HF tensors -> unrolled -> stacked (scanned model) -> HF gives the same tensors, and a
  scanned model on imported weights computes what the unrolled one does."""
  ids, valid, scanned = setup
  hf = convert.params_to_hf(jax.tree.map(np.asarray, scanned), CFG)
  assert "encoder.layer.2.attention.self.query.weight" in hf
  assert hf["encoder.layer.1.intermediate.dense.weight"].shape == (32, 16)
  imported = convert.params_from_hf(hf, CFG)
  assert "layer_0" in imported  # HF order: unrolled; the scanned model stacks on load
  hf_again = convert.params_to_hf(to_layout(imported, True), CFG)
  assert hf.keys() == hf_again.keys()
  for k in hf:
    np.testing.assert_array_equal(hf[k], hf_again[k])
  x_s, _ = BertEncoder(CFG).apply({"params": to_layout(imported, True)}, ids, attention_mask=valid)
  x_u, _ = BertEncoder(dataclasses.replace(CFG, scan_layers=False)).apply(
      {"params": imported}, ids, attention_mask=valid)
  np.testing.assert_allclose(x_s, x_u, rtol=1e-5, atol=1e-5)


def test_scan_is_the_default_from_six_layers():
  assert not BertConfig(vocab_size=8, num_layers=4, hidden_size=8, num_heads=2).scanned
  assert BertConfig(vocab_size=8, num_layers=6, hidden_size=8, num_heads=2).scanned
  assert not BertConfig(vocab_size=8, num_layers=12, hidden_size=8, num_heads=2, scan_layers=False).scanned


@pytest.mark.slow
def test_training_checkpoint_of_the_other_layout_is_converted_on_restore(tmp_path):
  """A TrainState saved unrolled (before layers were scanned) resumes into a scanned trainer:
  parameters and Adam moments land stacked, with the same numbers."""
  import os

  import spanlm
  from spanlm import parallel, train
  from spanlm.checkpoint import Checkpointer

  def trainer(scan):
    c = spanlm.load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "bert.py:tiny"))
    c.model.num_layers, c.model.hidden_size, c.model.num_heads, c.model.intermediate_size = 2, 16, 2, 32
    c.model.scan_layers, c.model.vocab_multiple, c.train.seq_len = scan, 8, 16
    return spanlm.Trainer(c, 64, np.ones(64, bool), parallel.make_mesh(c.mesh, jax.devices()[:1]))

  old = trainer(False)
  state = old.init_state()
  state = state.replace(opt_state=jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state.opt_state))
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(3, state, {"iterator": {}})
  ckpt.close()
  new = trainer(True)
  ckpt = Checkpointer(str(tmp_path))
  step, restored, _ = train._restore(ckpt, new)
  ckpt.close()
  assert step == 3
  assert restored.params["encoder"]["layers"]["output"]["kernel"].shape == (2, 32, 16)
  want = jax.tree.leaves(stack_layers(jax.tree.map(np.asarray, state.params["encoder"])))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored.params["encoder"]), want))
  mu = [x for x in jax.tree.leaves(restored.opt_state) if getattr(x, "ndim", 0) == 3 and x.shape[:2] == (2, 32)]
  assert mu and all(np.all(np.asarray(m) != 0) for m in mu)  # moments (init 0, +1 above) came across


@pytest.mark.parametrize("name", ["lamb", "lars"])
@pytest.mark.slow
def test_trust_ratios_stay_per_layer_when_layers_are_stacked(name):
  """LAMB/LARS are layer-wise: on stacked (scanned) parameters each layer's slice gets its own
  trust ratio, so the update equals the one on the unrolled tree."""
  from spanlm.optim.lamb import TrustRatioState, lamb
  from spanlm.optim.lars import lars
  rng = np.random.default_rng(0)
  unrolled = {"encoder": {f"layer_{i}": {"kernel": jnp.asarray(rng.normal(size=(4, 3)) * (i + 1), jnp.float32),
                                         "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
                          for i in range(3)}}
  grads_u = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32) * 10, unrolled)
  stacked = {"encoder": stack_layers(unrolled["encoder"])}
  grads_s = {"encoder": stack_layers(grads_u["encoder"])}
  tx = lamb(1e-2, weight_decay=0.01) if name == "lamb" else lars(1e-2, weight_decay=0.01)
  up_u, st_u = tx.update(grads_u, tx.init(unrolled), unrolled)
  up_s, st_s = tx.update(grads_s, tx.init(stacked), stacked)
  for a, b in zip(jax.tree.leaves(unstack_layers(up_s["encoder"])), jax.tree.leaves(up_u["encoder"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  ratios = lambda st: sorted(np.concatenate([np.ravel(x.trust_ratio) for x in jax.tree.leaves(
      st, is_leaf=lambda n: isinstance(n, TrustRatioState)) if isinstance(x, TrustRatioState)]))
  np.testing.assert_allclose(ratios(st_s), ratios(st_u), rtol=1e-5)
