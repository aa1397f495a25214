"""Distillation: the losses against hand-checkable values and NumPy references written from
DistilBERT's distiller.py and TinyBERT's general_distill.py, NSP teachers, the student's
initialisation from the teacher, a frozen teacher, and a different vocabulary refused."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spanlm
from spanlm import parallel
from spanlm.objectives import base as pretraining
from spanlm.objectives import distill
from spanlm.checkpoint import Checkpointer
from spanlm.data.tokenizer import Tokenizer

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")
L, B = 32, 8


def _config(spec, **model):
  c = spanlm.load_config(os.path.join(EXPERIMENTS, spec))
  c.train.batch_size, c.train.seq_len, c.train.num_steps = B, L, 50
  c.schedule.warmup_steps = 0
  c.optimizer.learning_rate = 3e-3
  c.model.vocab_multiple = 8
  c.mesh.data = 1
  for k, v in model.items():
    c.model[k] = v
  return c


def _teacher_workdir(workdir, spec, tok, table):
  """A teacher workdir (config.json + one checkpoint of `spec`'s objective) on the sample tokenizer."""
  tconf = _config(spec)
  teacher = pretraining.make_objective(tconf, tok.vocab_size, table)
  params = nn.meta.unbox(jax.jit(teacher.init_params)(jax.random.PRNGKey(0)))
  ckpt = Checkpointer(workdir)
  ckpt.save(1, {"params": params})  # what distill.load_teacher reads of a TrainState
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(tconf.to_json_best_effort())
  return tconf, params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A BERT-tiny teacher workdir on the sample tokenizer, and a batch."""
  tok = Tokenizer.load(distill.SAMPLE_TOKENIZER)
  table = tok.word_start_table()
  workdir = str(tmp_path_factory.mktemp("teacher"))
  tconf, params = _teacher_workdir(workdir, "bert.py:tiny", tok, table)
  mesh = parallel.make_mesh(tconf.mesh, jax.devices()[:1])
  rng = np.random.default_rng(0)
  ids = rng.integers(5, tok.vocab_size, size=(B, L)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  ids[1, 20:], ids[1, 19] = 0, 3
  batch = {"input_ids": ids, "segment_ids": np.zeros_like(ids)}
  return dict(tok=tok, table=table, workdir=workdir, tconf=tconf, mesh=mesh, params=params, batch=batch)


def _student(setup, **model):
  c = _config("distill.py:tiny", **model)
  c.distill.teacher_workdir = setup["workdir"]
  return c


def test_layer_map_is_uniform():
  assert distill.layer_map(2, 4) == [0, 2, 4]
  assert distill.layer_map(3, 12) == [0, 4, 8, 12]
  assert distill.layer_map(2, 2) == [0, 1, 2]


def test_soft_target_loss_matches_the_definition():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 6))
  w = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  T = 2.0

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  pt, ps = softmax(t[..., :5] / T), softmax(s[..., :5] / T)  # class 5 is vocabulary padding
  want = T ** 2 * np.sum(w * np.sum(pt * np.log(pt / ps), -1))
  got = distill.soft_target_sum(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), T, num_classes=5)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_cosine_and_score_errors_by_hand():
  s = jnp.array([[[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]]])
  t = jnp.array([[[0.0, 2.0], [2.0, 2.0], [9.0, 9.0]]])
  # 1 - cos: orthogonal 1, parallel 0; the third position is padding (weight 0).
  assert float(distill.cosine_sum(s, t, jnp.array([[1.0, 1.0, 0.0]]))) == pytest.approx(1.0, abs=1e-6)
  a = jnp.zeros((1, 2, 2, 2)).at[0, 0, 0, 1].set(3.0)
  assert float(distill.score_sq_error_sum(a, jnp.zeros_like(a))) == 9.0
  # Different head counts: head-averaged first, (3/2)² = 2.25.
  assert float(distill.score_sq_error_sum(a, jnp.zeros((1, 4, 2, 2)))) == 2.25


def test_student_layers_from_teacher_are_distilberts():
  assert distill.student_layers_from_teacher(6, 12) == [0, 2, 4, 7, 9, 11]  # extract_distilbert.py
  assert distill.student_layers_from_teacher(2, 4) == [0, 3]
  with pytest.raises(ValueError, match="cannot start"):
    distill.student_layers_from_teacher(4, 2)


@pytest.fixture(scope="module")
def same_size(setup):
  """A 2-layer student of the 2-layer teacher's width, on one prepared batch."""
  c = _student(setup, num_layers=None, hidden_size=None, num_heads=None, intermediate_size=None)
  c.distill.hidden_weight = c.distill.attention_weight = c.distill.cosine_weight = 1.0
  obj = distill.Distill(c, setup["tok"].vocab_size, setup["table"])
  frozen = obj.frozen_inputs(setup["mesh"])
  prepared = obj.prepare(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, setup["batch"]))
  params = nn.meta.unbox(jax.jit(obj.init_params)(jax.random.PRNGKey(5)))
  return dict(obj=obj, frozen=frozen, prepared=prepared, den=obj.denominators(prepared), params=params)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.slow
def test_losses_match_distilbert_and_tinybert_definitions(same_size):
  """From the models' raw outputs, in NumPy: DistilBERT's KL over every non-pad token
  (KLDivLoss batchmean over the selected tokens, × T²), TinyBERT's MSEs over the whole
  [B, L, ...] block summed over the mapped layers, with PRE-softmax scores (masked keys 0)."""
  obj, frozen, mb, den, params = (same_size[k] for k in ("obj", "frozen", "prepared", "den", "params"))
  sums = jax.jit(lambda p: obj.sums(p, mb, None, True, frozen))(params)
  m = {k: float(v) for k, v in obj.metrics(sums, den).items()}
  B, L = mb["input_ids"].shape
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))

  @jax.jit
  def raw(params, frozen):  # the models' own outputs; every loss below is recomputed in NumPy
    (out_s, var_s), (out_t, var_t) = (obj._forward(obj.model, params, mb, None, True, pos),
                                      obj._forward(obj.teacher, frozen, mb, None, True, pos))
    hid_s, att_s = distill.internals(var_s, obj.model.cfg, mb["attention_mask"])
    hid_t, att_t = distill.internals(var_t, obj.teacher_cfg, mb["attention_mask"])
    return out_s["mlm_logits"], out_t["mlm_logits"], hid_s, att_s, hid_t, att_t

  logits_s, logits_t, hid_s, att_s, hid_t, att_t = jax.device_get(raw(params, frozen))
  V, T = obj.vocab_size, 2.0
  tok = np.asarray(mb["attention_mask"])
  ps = _softmax(np.asarray(logits_s, np.float64)[..., :V] / T)
  pt = _softmax(np.asarray(logits_t, np.float64)[..., :V] / T)
  kl = np.sum(pt * (np.log(pt) - np.log(ps)), -1)
  assert m["soft_loss"] == pytest.approx(T ** 2 * kl[tok].mean(), rel=1e-4)
  # TinyBERT's attention targets, recomputed from layer 0's input and its query/key weights.
  x = np.asarray(hid_t[0], np.float64)  # layer 0's input: the embeddings' output
  att = jax.tree.map(np.asarray, frozen["encoder"]["layer_0"]["attention"])
  q = np.einsum("bld,dhk->blhk", x, att["query"]["kernel"]) + att["query"]["bias"]
  k = np.einsum("bld,dhk->blhk", x, att["key"]["kernel"]) + att["key"]["bias"]
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(tok[:, None, None, :], scores, 0.0)
  np.testing.assert_allclose(np.asarray(att_t[0]), scores, atol=1e-4, rtol=1e-4)
  assert obj.mapping == [0, 1, 2]
  f = lambda a: np.asarray(a, np.float64)
  want_hid = sum(((f(hid_s[i]) - f(hid_t[i])) ** 2).mean() for i in range(3))  # summed, not averaged
  want_att = sum(((f(att_s[i]) - f(att_t[i])) ** 2).mean() for i in range(2))
  assert m["hidden_loss"] == pytest.approx(want_hid, rel=1e-4)
  assert m["attention_loss"] == pytest.approx(want_att, rel=1e-4)
  hs, ht = f(hid_s[-1]), f(hid_t[-1])
  cos = (hs * ht).sum(-1) / np.linalg.norm(hs, axis=-1) / np.linalg.norm(ht, axis=-1)
  assert m["cosine_loss"] == pytest.approx((1 - cos)[tok].mean(), rel=1e-4)


def test_student_starts_from_every_other_teacher_layer(same_size, setup):
  obj = same_size["obj"]
  obj.config.distill.init_from_teacher = True
  try:
    obj.copied_layers = distill.student_layers_from_teacher(2, 2)
    start = jax.jit(obj.initial_params)(same_size["params"], same_size["frozen"])
  finally:
    obj.config.distill.init_from_teacher = False
  t = setup["params"]
  for m, n in enumerate(obj.copied_layers):
    jax.tree.map(np.testing.assert_array_equal, start["encoder"][f"layer_{m}"], t["encoder"][f"layer_{n}"])
  for key in ("mlm_transform", "mlm_bias"):
    jax.tree.map(np.testing.assert_array_equal, start[key], t[key])
  jax.tree.map(np.testing.assert_array_equal, start["encoder"]["embeddings"], t["encoder"]["embeddings"])


@pytest.mark.slow
def test_nsp_teacher_with_pooler(setup, tmp_path):
  """An MLM+NSP teacher (experiments/bert.py:nsp_tiny: pooler + pair head) teaches."""
  _teacher_workdir(str(tmp_path), "bert.py:nsp_tiny", setup["tok"], setup["table"])
  c = _student(setup)
  c.distill.teacher_workdir = str(tmp_path)
  obj = distill.Distill(c, setup["tok"].vocab_size, setup["table"])
  frozen = obj.frozen_inputs(setup["mesh"])
  assert "pooler" in frozen["encoder"]
  prepared = obj.prepare(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, setup["batch"]))
  params = nn.meta.unbox(jax.jit(obj.init_params)(jax.random.PRNGKey(1)))
  m = obj.metrics(obj.sums(params, prepared, None, True, frozen), obj.denominators(prepared))
  assert np.isfinite(float(m["loss"])) and float(m["soft_loss"]) > 0


@pytest.mark.slow
def test_student_trains_and_teacher_stays_frozen(setup):
  c = _student(setup)
  trainer = spanlm.Trainer(c, setup["tok"].vocab_size, setup["table"], setup["mesh"])
  assert "distill_project" in trainer.abstract_state.params  # H 64 student -> H 128 teacher
  teacher_before = jax.tree.map(np.asarray, trainer.frozen)
  state = trainer.init_state()
  batch = parallel.global_batch(setup["batch"], trainer.mesh)
  losses = []
  for _ in range(10):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
  jax.tree.map(np.testing.assert_array_equal, teacher_before, jax.tree.map(np.asarray, trainer.frozen))


def test_teacher_with_a_different_vocabulary_is_refused(setup):
  table = np.array(setup["table"])
  with pytest.raises(ValueError, match="vocabulary"):
    distill.Distill(_student(setup), 500, table[:500])
  flipped = table.copy()
  flipped[100] = ~flipped[100]
  with pytest.raises(ValueError, match="teacher's tokenizer"):
    distill.Distill(_student(setup), len(table), flipped)


def test_missing_teacher_is_a_clear_error(tmp_path, setup):
  c = _student(setup)
  c.distill.teacher_workdir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.json or checkpoints"):
    distill.Distill(c, setup["tok"].vocab_size, setup["table"])
  c.distill.teacher_workdir = ""
  with pytest.raises(ValueError, match="teacher_workdir is empty"):
    distill.Distill(c, setup["tok"].vocab_size, setup["table"])
