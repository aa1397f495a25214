"""Experiment files read like the papers' tables; bad configs fail early and say why."""

import os
from types import SimpleNamespace

import pytest

import spanlm
from spanlm import configs, parallel

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def load(name):
  return spanlm.load_config(os.path.join(EXPERIMENTS, name))


def test_span_bert_is_the_papers_recipe():
  c = load("span_bert.py")
  assert (c.masking.scheme, c.masking.rate, c.masking.geometric_p, c.masking.max_span) == ("span", 0.15, 0.2, 10)
  assert c.objective.sbo and c.model.size == "base"
  assert (c.train.batch_size, c.train.seq_len) == (256, 512)
  assert (c.optimizer.name, c.optimizer.learning_rate) == ("adamw", 1e-4)
  assert (c.schedule.name, c.schedule.warmup_steps) == ("warmup_linear", 10_000)
  assert load("span_bert.py:large").model.size == "large"
  tiny = load("span_bert.py:tiny")
  assert tiny.model.size == "tiny" and tiny.masking.scheme == "span" and tiny.train.num_steps <= 1000
  configs.validate(c)
  configs.validate(tiny)


def test_bert_baseline_and_presets():
  c = load("bert.py")
  assert c.masking.scheme == "token" and not c.objective.sbo
  assert load("bert.py:wwm").masking.scheme == "whole_word"
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    load("bert.py:huge")


def test_config_is_locked_against_typos():
  c = load("span_bert.py:tiny")
  with pytest.raises(AttributeError):
    c.train.num_stepz = 3


@pytest.mark.parametrize("field,value,message", [
    ("train.seq_len", 1024, "exceeds the model's max_position_embeddings=512"),
    ("train.batch_size", 30, "not divisible by grad_accum_steps=4"),
    ("masking.scheme", "spans", "choose one of"),
    ("masking.rate", 1.5, "must be in \\(0, 1\\)"),
    ("model.size", "huge", "config.model.size='huge'"),
    ("optimizer.learning_rate", -1.0, "must be positive"),
])
def test_validate_names_the_field(field, value, message):
  c = load("span_bert.py:tiny")
  c.train.grad_accum_steps = 4 if field == "train.batch_size" else 1
  group, key = field.split(".")
  c[group][key] = value
  with pytest.raises(ValueError, match=message):
    configs.validate(c)


def test_mesh_shape_resolves_minus_one():
  m = lambda d, f, t: SimpleNamespace(data=d, fsdp=f, model=t)
  assert parallel.mesh_shape(m(-1, 1, 2), 8) == (4, 1, 2)
  assert parallel.mesh_shape(m(2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="not divisible"):
    parallel.mesh_shape(m(-1, 3, 1), 8)
  with pytest.raises(ValueError, match="8 devices are available"):
    parallel.mesh_shape(m(2, 2, 1), 8)
  with pytest.raises(ValueError, match="at most one axis"):
    parallel.mesh_shape(m(-1, -1, 1), 8)


def test_load_config_from_another_folder_says_where_it_looked(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match=f"relative paths are looked up from the current directory {tmp_path}"):
    spanlm.load_config("experiments/span_bert.py:tiny")


def test_warmup_longer_than_the_run_is_clamped():
  c = load("span_bert.py:tiny")
  c.train.num_steps = 30  # warmup_steps stays 50
  configs.validate(c)
  assert c.schedule.warmup_steps == 3
  c.schedule.warmup_steps = -1
  with pytest.raises(ValueError, match="warmup_steps=-1 must be >= 0"):
    configs.validate(c)
