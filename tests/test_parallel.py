"""Parallelism is a config change: every mesh computes the single-device step.

FSDP (parameters and Adam state sharded over `fsdp`), tensor parallelism
(`model`) and their combination with data parallelism, on 8 fake CPU devices,
give the same loss and the same parameters after a step as one device; the
activation sharding constraints keep XLA from the "Involuntary full
rematerialization" of the embedding gather under FSDP.
"""

import os

import jax
import numpy as np
import pytest

import spanlm
from spanlm import flops, parallel

V, L, B = 1000, 32, 16


def config(**mesh):
  c = spanlm.load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "span_bert.py:tiny"))
  c.train.batch_size, c.train.seq_len = B, L
  c.model.num_heads = 8  # so that model=8 splits the heads
  c.masking.scheme = "token"  # SBO stays on: its boundary gathers were where XLA re-sharded
  c.schedule.warmup_steps = 0
  c.optimizer.learning_rate = 3e-3
  # SpanBERT's Adam eps 1e-8 turns a gradient of ~1e-8 (embedding rows hit only through the tied
  # softmax) into a full signed step, so fp32 reduction order alone would move such entries by a
  # visible fraction of a step; 1e-6 (BERT's) keeps this an equality test of the sharding.
  c.optimizer.eps = 1e-6
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, V, size=(B, L)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  ids[3, 20:], ids[3, 19] = 0, 3
  return {"input_ids": ids, "segment_ids": np.zeros_like(ids)}


def one_step(n_devices, **mesh):
  c = config(**mesh)
  trainer = spanlm.Trainer(c, V, np.ones(V, bool), parallel.make_mesh(c.mesh, jax.devices()[:n_devices]))
  state, metrics = trainer.train_step(trainer.init_state(), parallel.global_batch(batch(), trainer.mesh))
  return trainer, state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def reference():
  return one_step(1, data=1, fsdp=1, model=1)


@pytest.mark.parametrize("mesh", [dict(data=1, fsdp=8, model=1), dict(data=2, fsdp=2, model=2),
                                  dict(data=1, fsdp=1, model=8)], ids=lambda m: "x".join(
                                      f"{k}{v}" for k, v in m.items() if v > 1))
@pytest.mark.slow
def test_mesh_step_equals_single_device(reference, mesh, capfd):
  _, s1, m1 = reference
  trainer, s8, m8 = one_step(8, **mesh)
  assert "Involuntary full rematerialization" not in capfd.readouterr().err
  for k in ("loss", "mlm_loss", "grad_norm"):
    assert m8[k] == pytest.approx(m1[k], rel=1e-5), k
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(s1.params)),
                          jax.tree.leaves(jax.device_get(s8.params))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
  # State really is sharded: a kernel and its Adam moment hold 1/shards of the elements each.
  shards = mesh["fsdp"] * mesh["model"]
  kernel = s8.params["encoder"]["layer_0"]["intermediate"]["kernel"]
  assert np.prod(kernel.sharding.shard_shape(kernel.shape)) * shards == kernel.size
  mu = jax.tree.leaves(s8.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
  mu_kernel = [x for x in jax.tree.leaves(s8.opt_state) if getattr(x, "shape", None) == kernel.shape][0]
  assert np.prod(mu_kernel.sharding.shard_shape(mu_kernel.shape)) * shards == kernel.size


def test_memory_estimate_is_close_to_the_compiled_footprint(reference):
  """flops.memory_estimate (params, grads, Adam, activations) vs XLA's memory_analysis on CPU."""
  trainer, state, _ = reference
  data = parallel.global_batch(batch(), trainer.mesh)
  m = trainer._train_step_jit.lower(state, data, trainer.frozen).compile().memory_analysis()
  compiled = m.argument_size_in_bytes + m.temp_size_in_bytes
  cfg = trainer.model.cfg
  est = flops.memory_estimate(num_params=trainer.num_params(), batch_per_device=B, seq_len=L,
                              num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                              intermediate_size=cfg.intermediate_size, num_heads=cfg.num_heads)
  # Arguments are the params + Adam state (3x params); grads and activations are temporaries.
  assert m.argument_size_in_bytes == pytest.approx(est["params_bytes"] * 3, rel=0.02)
  assert compiled == pytest.approx(est["total_bytes"], rel=0.5)


def test_flop_formula_counts_the_models_matmul_weights(reference):
  """6·N·L uses N = the encoder's kernels; the head term uses the MLM transform + tied decoder."""
  trainer, state, _ = reference
  cfg = trainer.model.cfg
  kernels = {jax.tree_util.keystr(p): x.size for p, x in jax.tree_util.tree_leaves_with_path(state.params)
             if "kernel" in jax.tree_util.keystr(p)}
  encoder = sum(n for k, n in kernels.items() if "'layer_" in k)
  assert flops.encoder_matmul_params(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == encoder
  transform = sum(n for k, n in kernels.items() if "mlm_transform" in k)
  assert flops.head_matmul_params(cfg.hidden_size, cfg.vocab_size) == transform + cfg.vocab_size * cfg.hidden_size
  # Hand count, BERT-base at 128 tokens, 20 predictions: 6·85M·128 + 12·12·128²·768 + 6·(768²+768·30522)·20.
  base = flops.train_flops_per_sequence(num_layers=12, hidden_size=768, intermediate_size=3072,
                                        vocab_size=30522, seq_len=128, num_predictions=20)
  assert base == 6 * 84934656 * 128 + 12 * 12 * 128 ** 2 * 768 + 6 * (768 ** 2 + 768 * 30522) * 20
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and flops.peak_flops("cpu") is None


@pytest.mark.slow
def test_remat_recomputes_the_same_gradients():
  """config.model.remat trades memory for recomputation; values and gradients are unchanged."""
  import jax.numpy as jnp

  from spanlm.models.bert import BertEncoder, config_for
  ids = jnp.asarray(np.random.default_rng(0).integers(5, 100, (2, 16)))
  results = {}
  for remat in ("none", "full", "dots_saveable"):
    model = BertEncoder(config_for("tiny", vocab_size=128, remat=remat))
    params = model.init(jax.random.PRNGKey(0), ids)
    loss = lambda p: jnp.mean(jnp.tanh(model.apply(p, ids, deterministic=False,
                                                   rngs={"dropout": jax.random.PRNGKey(1)})))
    results[remat] = jax.value_and_grad(loss)(params)
  for remat in ("full", "dots_saveable"):
    assert float(results[remat][0]) == pytest.approx(float(results["none"][0]), abs=1e-6)
    for a, b in zip(jax.tree.leaves(results[remat][1]), jax.tree.leaves(results["none"][1])):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
