"""Distillation: the losses match their equations, a student identical to its teacher has
zero distillation loss, the teacher stays frozen, and a different vocabulary is refused."""

import json
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A BERT-tiny teacher workdir (config.json + one checkpoint) on the sample tokenizer."""
  tok = Tokenizer.load(distill.SAMPLE_TOKENIZER)
  table = tok.word_start_table()
  workdir = str(tmp_path_factory.mktemp("teacher"))
  tconf = _config("bert.py:tiny")
  mesh = parallel.make_mesh(tconf.mesh, jax.devices()[:1])
  teacher = pretraining.make_objective(tconf, tok.vocab_size, table)
  params = nn.meta.unbox(jax.jit(teacher.init_params)(jax.random.PRNGKey(0)))
  ckpt = Checkpointer(workdir)
  ckpt.save(1, {"params": params})  # what distill.load_teacher reads of a TrainState
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(tconf.to_json_best_effort())
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


def test_identical_student_has_zero_distillation_loss(setup):
  """Student = teacher (same sizes, teacher's params): soft, hidden and attention terms vanish."""
  c = _student(setup, num_layers=None, hidden_size=None, num_heads=None, intermediate_size=None)
  obj = distill.Distill(c, setup["tok"].vocab_size, setup["table"])
  frozen = obj.frozen_inputs(setup["mesh"])
  prepared = obj.prepare(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, setup["batch"]))
  den = obj.denominators(prepared)
  params = {k: v for k, v in setup["params"].items() if k in frozen}
  metrics = jax.jit(lambda p: obj.metrics(obj.sums(p, prepared, None, True, frozen), den))
  m = metrics(params)
  for k in ("soft_loss", "hidden_loss", "attention_loss"):
    assert abs(float(m[k])) < 1e-6, (k, float(m[k]))  # float32 rounding only
  assert float(m["mlm_loss"]) > 1.0  # the hard MLM loss of a random teacher is not zero
  # ... and a different student is penalised on every term (attention maps of a randomly
  # initialised model are close to uniform, hence the small but clearly non-zero threshold).
  other = jax.tree.map(lambda x: x * 1.5, params)
  m2 = metrics(other)
  for k in ("soft_loss", "hidden_loss", "attention_loss"):
    assert float(m2[k]) > 2e-5, (k, float(m2[k]))


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
