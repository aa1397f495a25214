"""ELECTRA: sizes from the paper, shared embeddings, sampling without gradient, the
discriminator in BertEncoder's layout, and a loss that falls."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spanlm
from spanlm import parallel
from spanlm.objectives import electra, masking
from spanlm.models import electra as em
from spanlm.models.bert import BertEncoder, config_for

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")
V, L, B = 300, 32, 8


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_electra_small_has_14m_parameters():
  """The paper's ELECTRA-Small discriminator (Table 6): V 30522, E 128, H 256, 12 layers, FFN 1024."""
  from spanlm import summary

  c = spanlm.load_config(os.path.join(EXPERIMENTS, "electra.py"))
  c.model.vocab_multiple = 1
  _, params = summary.abstract_params(c, 30522)
  Vv, E, H, F, n = 30522, 128, 256, 1024, 12
  embeddings = (Vv + 512 + 2) * E + 2 * E + E * H + H  # tables, LayerNorm, E -> H projection
  layer = 4 * (H * H + H) + (H * F + F) + (F * H + H) + 2 * 2 * H  # attention, FFN, 2 LayerNorms
  assert _count(params["encoder"]) == embeddings + n * layer
  disc = _count(params["encoder"]) + _count(params["discriminator_dense"]) + _count(params["discriminator_out"])
  assert round(disc / 1e6) == 14
  gen = params["generator"]
  assert "embeddings" not in gen and "word_embeddings" not in str(jax.tree.structure(gen))  # shared
  assert gen["layer_0"]["intermediate"]["kernel"].shape == (64, 256)  # 1/4 width, FFN 4H
  # ELECTRA's get_token_logits: one Dense(H_gen -> E) + GELU + LayerNorm into the tied table.
  head = {k for k in gen if not k.startswith("layer_")}
  assert head == {"embeddings_project", "mlm_dense", "mlm_norm", "mlm_bias"}, head
  assert gen["mlm_dense"]["kernel"].shape == (64, 128)


@pytest.fixture(scope="module")
def tiny():
  c = spanlm.load_config(os.path.join(EXPERIMENTS, "electra.py:tiny"))
  c.train.batch_size, c.train.seq_len = B, L
  c.model.vocab_multiple = 8
  c.model.num_layers = 1  # one layer each: compile time dominates these tests
  c.schedule.warmup_steps = 0
  c.optimizer.learning_rate = 3e-3
  c.optimizer.bias_correction = True  # ELECTRA's uncorrected Adam needs its warmup; none in 10 steps
  c.mesh.data = 1
  table = np.zeros(V, bool)
  table[5:200] = True
  obj = electra.Electra(c, V, table)
  params = nn.meta.unbox(jax.jit(obj.init_params)(jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  ids = rng.integers(5, V, size=(B, L)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  ids[1, 20:], ids[1, 19] = 0, 3
  batch = {"input_ids": ids, "segment_ids": np.zeros_like(ids)}
  return dict(c=c, table=table, obj=obj, params=params, batch=batch)


@pytest.mark.slow
def test_discriminator_is_a_bert_encoder(tiny):
  """params['encoder'] has exactly BertEncoder's tree, so fine-tuning/export take it unchanged."""
  cfg = tiny["obj"].model.cfg
  ref = jax.eval_shape(lambda: BertEncoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32)))
  disc = em.discriminator_params(tiny["params"])
  assert jax.tree.structure(nn.meta.unbox(ref["params"])) == jax.tree.structure(disc)
  assert jax.tree.map(lambda a, b: a.shape == b.shape, nn.meta.unbox(ref["params"]), disc)
  with pytest.raises(ValueError, match="not an ELECTRA params tree"):
    em.discriminator_params({"encoder": disc})


def test_sampling_follows_the_generator_and_skips_special_ids():
  probs = np.array([0, 0, 0, 0, 0, 0.5, 0.3, 0.2, 0.0, 0.0], np.float32)
  logits = jnp.log(jnp.asarray(probs) + 1e-12)
  logits = logits.at[:5].set(10.0).at[8:].set(10.0)  # reserved ids and vocabulary padding: never drawn
  n = 4000
  seeds = jnp.arange(n, dtype=jnp.uint32)
  sample = jax.jit(em.sample_replacements, static_argnums=(2, 3))
  draws = np.asarray(sample(seeds, jnp.broadcast_to(logits, (n, 1, 10)), 8, 5))[:, 0]
  assert draws.min() >= 5 and draws.max() <= 7
  freq = np.bincount(draws, minlength=10)[5:8] / n
  se = np.sqrt(probs[5:8] * (1 - probs[5:8]) / n)
  assert np.all(np.abs(freq - probs[5:8]) < 5 * se)


def test_generator_input_is_85_mask_15_kept(tiny):
  """pretrain_helpers.mask: of the masked positions 85% get [MASK], 15% keep their token."""
  obj = tiny["obj"]
  ids = np.random.default_rng(1).integers(5, V, size=(256, L)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  prepared = jax.jit(obj.prepare)(jax.random.PRNGKey(4), {"input_ids": ids, "segment_ids": np.zeros_like(ids)})
  w = np.asarray(prepared["weights"]) > 0
  pos = np.asarray(prepared["positions"])
  fed = np.take_along_axis(np.asarray(prepared["masked_ids"]), pos, 1)[w]
  orig = np.take_along_axis(ids, pos, 1)[w]
  is_mask = fed == masking.MASK_ID
  assert np.all(is_mask | (fed == orig))  # never a random token
  n = is_mask.size
  assert abs(is_mask.mean() - 0.85) < 5 * np.sqrt(0.85 * 0.15 / n), (is_mask.mean(), n)


@pytest.mark.slow
def test_replaced_labels_and_gradient_paths(tiny):
  """The samples are token ids, so the discriminator's loss reaches the shared embeddings and
  the discriminator but never the generator's own layers; the generator's MLM loss never
  reaches the discriminator's layers or its head. (ELECTRA's stop_gradient on the samples
  cuts nothing either: its samples are one-hot argmaxes.)"""
  obj, params = tiny["obj"], tiny["params"]
  prepared = obj.prepare(jax.random.PRNGKey(1), jax.tree.map(jnp.asarray, tiny["batch"]))
  den = obj.denominators(prepared)
  # A sample equal to the original token is labelled 'original'.
  ids = jnp.array([[2, 10, 11, 12, 3]])
  out = em.corrupt(ids, jnp.array([[1, 2, 0]]), jnp.array([[1.0, 1.0, 0.0]]), jnp.array([[10, 99, 77]]))
  np.testing.assert_array_equal(np.asarray(out), [[2, 10, 99, 12, 3]])  # slot 3 is padding: untouched

  def disc_only(p):
    s = obj.sums(p, prepared, jax.random.PRNGKey(2), True)
    return s["disc_loss"] / den["num_tokens"], obj.metrics(s, den)

  def mlm_only(p):
    return obj.sums(p, prepared, jax.random.PRNGKey(2), True)["mlm_loss"] / den["num_predictions"]

  g, m = jax.jit(jax.grad(disc_only, has_aux=True))(params)
  assert _count(g["generator"]) > 0
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g["generator"]))
  layers = lambda g: {k: v for k, v in g["encoder"].items() if k != "embeddings"}  # the discriminator's own
  assert float(optax_norm(layers(g))) > 0
  assert float(optax_norm(g["encoder"]["embeddings"]["word_embeddings"])) > 0
  g = jax.jit(jax.grad(mlm_only))(params)
  assert float(optax_norm(g["generator"])) > 0
  assert float(optax_norm(g["encoder"]["embeddings"]["word_embeddings"])) > 0  # shared
  for k in ("discriminator_dense", "discriminator_out"):
    assert float(optax_norm(g[k])) == 0.0
  assert float(optax_norm(layers(g))) == 0.0
  # Loss = mlm + 50 * disc, each normalised by its own count.
  np.testing.assert_allclose(float(m["loss"]), float(m["mlm_loss"]) + 50 * float(m["disc_loss"]), rtol=1e-5)
  assert 0.05 < float(m["replaced_fraction"]) < 0.2  # ~15% masked, almost all changed by sampling
  assert float(den["num_tokens"]) == float((tiny["batch"]["input_ids"] != masking.PAD_ID).sum())


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


@pytest.mark.slow
def test_electra_trains(tiny):
  mesh = parallel.make_mesh(tiny["c"].mesh, jax.devices()[:1])
  trainer = spanlm.Trainer(tiny["c"], V, tiny["table"], mesh)
  state = trainer.init_state()
  batch = parallel.global_batch(tiny["batch"], mesh)
  hist = []
  for _ in range(10):
    state, m = trainer.train_step(state, batch)
    hist.append(jax.device_get(m))
  loss = [float(h["loss"]) for h in hist]
  assert np.all(np.isfinite(loss)) and loss[-1] < 0.7 * loss[0], loss
  assert float(hist[-1]["mlm_loss"]) < float(hist[0]["mlm_loss"])
