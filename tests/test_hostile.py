"""Hostile input: each is a clear message before training (or a counted skip), never a deep traceback.

Empty/binary/latin-1/control-character corpus files are covered in test_data.py
(read_documents) and test_cli.py (the CLI); here: what those leave out.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spanlm import checkpoint as ckpt_lib
from spanlm.data import prepare, sample
from spanlm.data.corpus import CorpusError, read_documents
from spanlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
  return subprocess.run([sys.executable, "-m", "spanlm.main", "--config=experiments/span_bert.py:tiny", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_megabyte_lines_lose_no_token(tmp_path):
  """A 1 MB paragraph of words and a 1 MB 'word' with no space: every token lands in a row."""
  rng = np.random.default_rng(0)
  words = np.array("the of and a to in is was that he it for with as his on be at by".split())
  texts = {"long_line.txt": " ".join(rng.choice(words, 200_000))[:1_000_000],
           "no_spaces.txt": "x" * 1_000_000,
           # Tabs, form feeds and a few (< 1%) other control characters are text, not binary.
           "some_controls.txt": "a tab\there and a form feed \x0c in text. " * 200 + "a bell \x07 once."}
  for name, text in texts.items():
    (tmp_path / name).write_text(text + "\n")
  tok = Tokenizer.load(sample.tokenizer_path())
  out = tmp_path / "prepared"
  stats = prepare.prepare_corpus(str(tmp_path / "*.txt"), sample.tokenizer_path(), str(out), seq_len=128,
                                 validation_fraction=0.01)
  expected = sum(len(tok.encode(" ".join(t.split()))) for t in texts.values())
  ds = prepare.load_prepared(str(out))
  rows = np.concatenate([np.stack([split[i]["input_ids"] for i in range(len(split))])
                         for split in (ds.train, ds.validation)])
  assert rows.shape[1] == 128
  assert int(np.isin(rows, (PAD_ID, CLS_ID, SEP_ID), invert=True).sum()) == expected
  assert not stats.get("files_skipped")


@pytest.mark.parametrize("data, problem", [
    ("UTF-16 text".encode("utf-16"), "is UTF-16"),
    (b"\n" * 1000 + b"\t \r\n" * 1000, "file is empty"),
])
def test_more_bad_files_are_named(tmp_path, data, problem):
  path = tmp_path / "bad.txt"
  path.write_bytes(data)
  with pytest.raises(CorpusError, match=problem):
    list(read_documents([str(path)]))


def test_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
  bad = tmp_path / "sp.model"
  bad.write_bytes(open(sample.tokenizer_path(), "rb").read()[:1000])  # truncated copy
  with pytest.raises(ValueError, match="not a readable SentencePiece model"):
    Tokenizer.load(str(bad))


def test_checkpoint_with_another_vocabulary_is_refused_not_quarantined(tmp_path):
  """Resuming with a different tokenizer (embedding rows) names the cause and moves nothing."""
  c = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  c.save(1, {"embedding": jnp.zeros((128, 8))})
  other = {"embedding": jax.ShapeDtypeStruct((256, 8), jnp.float32,
                                             sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  with pytest.raises(ValueError, match="does not match the current model/optimizer config"):
    c.restore_latest(other)
  assert c.all_steps() == [1] and not os.path.exists(tmp_path / "checkpoints_corrupt")
  c.close()


@pytest.mark.parametrize("flag, message", [
    ("--config.train.batch_size=abc", "flag --config.train.batch_size=abc: invalid literal for int()"),
    ("--config.train.batch_size=1.5", "flag --config.train.batch_size=1.5: invalid literal for int()"),
    ("--config.optimizer.learning_rate=fast", "could not convert string to float: 'fast'"),
    ("--config.train.num_steps=-5", "config.train.num_steps=-5 must be a positive integer"),
])
@pytest.mark.slow
def test_config_values_of_the_wrong_type(tmp_path, flag, message):
  r = _cli(f"--workdir={tmp_path}", flag)
  assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_workdir_that_cannot_be_created(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  r = _cli(f"--workdir={blocker}/run")
  assert r.returncode == 2 and "is not writable" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_reusing_a_donated_state_says_to_use_the_returned_one():
  """A notebook cell `state, m = trainer.train_step(state0, batch)` run twice: state0 was donated."""
  import spanlm
  from spanlm import parallel
  config = spanlm.load_config(os.path.join(ROOT, "experiments/span_bert.py:tiny"))
  config.train.batch_size, config.train.seq_len = 8, 16
  config.model.num_layers, config.model.hidden_size, config.model.intermediate_size = 1, 32, 64
  tok = Tokenizer.load(sample.tokenizer_path())
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  trainer = spanlm.Trainer(config, tok.vocab_size, tok.word_start_table(), mesh)
  state0 = trainer.init_state()
  ids = np.tile(np.arange(5, 21, dtype=np.int32), (8, 1))
  ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
  batch = parallel.global_batch({"input_ids": ids, "segment_ids": np.zeros_like(ids)}, trainer.mesh)
  state, _ = trainer.train_step(state0, batch)
  with pytest.raises(ValueError, match="consumed \\(donated\\) by an earlier train_step; use the state it returned"):
    trainer.train_step(state0, batch)
  state, metrics = trainer.train_step(state, batch)  # the returned state works
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
