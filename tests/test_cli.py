"""The command-line job end to end: train, evaluate, checkpoint, resume, refuse bad input."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from spanlm import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough to run in seconds; the data path (bundled sample -> array_record -> grain) is the real one.
FAST = ["--config.train.batch_size=16", "--config.train.seq_len=64", "--config.train.log_every=5",
        "--config.train.eval_every=10", "--config.train.eval_batches=2", "--config.train.checkpoint_every=10",
        "--config.schedule.warmup_steps=5",
        # 20 steps from the unigram-initialised biases at lr 3e-3 (the preset) show no learning yet:
        # the pipeline check runs from zero biases at lr 1e-3 (the unigram start: test_train).
        "--config.optimizer.learning_rate=1e-3", "--config.model.output_bias_init=zeros"]


def spanlm_main(workdir, *args, config="experiments/span_bert.py:tiny", env=None):
  # One CPU device, as a user has; XLA's cheap CPU compile options (conftest.py: level 0), the
  # same for every run of a test. `env`: more entries (conftest.py's cli_no_plot).
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
             **(env or {}))
  return subprocess.run([sys.executable, "-m", "spanlm.main", f"--config={config}", f"--workdir={workdir}",
                         *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, cli_no_plot):
  """20 steps over two invocations of the same command (10 + 10), and a third once it is done.

  Only the second draws curves.png (the first and third run without matplotlib: conftest.py).

  That the resumed run is bit-identical to an uninterrupted one is checked through the same
  restore path, after SIGKILL and SIGTERM, by tests/test_resilience.py (and on gs:// by
  tests/test_gcs.py); a fourth CLI run here for the same check cost ~30 s of the suite.
  """
  split = tmp_path_factory.mktemp("split")
  runs = {
      "first": spanlm_main(split, *FAST, "--config.train.num_steps=20", "--config.train.stop_at_step=10",
                           env=cli_no_plot),
      "second": spanlm_main(split, *FAST, "--config.train.num_steps=20"),
      "again": spanlm_main(split, *FAST, "--config.train.num_steps=20", env=cli_no_plot),
  }
  for name, r in runs.items():
    assert r.returncode == 0, f"{name} run failed:\n{r.stderr[-4000:]}"
  return split, runs


@pytest.mark.slow
def test_tiny_run_trains_evaluates_and_checkpoints(resumed_run):
  workdir, runs = resumed_run
  rows = read_metrics(workdir)
  train = [r for r in rows if "train/loss" in r]
  evals = [r for r in rows if "eval/mlm_accuracy" in r]
  assert [r["step"] for r in train] == [5, 10, 15, 20]
  assert [r["step"] for r in evals] == [10, 20]
  for key in ("train/mlm_loss", "train/sbo_loss", "learning_rate", "tokens_per_sec"):
    assert all(np.isfinite(r[key]) for r in train), key
  assert train[-1]["train/loss"] < train[0]["train/loss"]
  assert evals[-1]["eval/mlm_loss"] < evals[0]["eval/mlm_loss"]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
  assert os.listdir(workdir / "tensorboard")
  assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn at the end of the second run
  assert "curves: " in runs["second"].stderr and "matplotlib is not installed" in runs["first"].stderr
  assert "held-out mlm loss" in runs["first"].stderr and "held-out mlm loss" in runs["second"].stderr
  assert json.loads(runs["first"].stdout.strip().splitlines()[-1])["step"] == 10
  assert json.loads(runs["second"].stdout.strip().splitlines()[-1])["step"] == 20


@pytest.mark.slow
def test_rerun_continues_where_the_first_stopped(resumed_run):
  workdir, runs = resumed_run
  assert "resumed from" in runs["second"].stderr and "at step 10" in runs["second"].stderr
  logged = [line.split("step ")[1].split("/")[0] for line in runs["second"].stderr.splitlines() if "| loss" in line]
  assert logged == ["15", "20"]  # the second invocation trained steps 11-20 only
  # Checkpoint 20 holds 20 optimizer steps and the data position after 20 batches.
  raw, data = ckpt_lib.read_raw(workdir / "checkpoints" / "20")
  assert int(raw["step"]) == 20 and data["iterator"] == {"next_index": 20}


@pytest.mark.slow
def test_rerun_of_a_finished_run_says_so(resumed_run):
  _, runs = resumed_run
  assert "run is complete" in runs["again"].stderr
  assert json.loads(runs["again"].stdout.strip().splitlines()[-1]) == {"step": 20, "complete": True}


def test_unknown_config_key_is_a_clear_error(tmp_path):
  r = spanlm_main(tmp_path, "--config.train.num_stepz=3")
  assert r.returncode != 0
  assert "--config.train.num_stepz names a config field that does not exist" in r.stderr
  assert "Did you mean \"num_steps\"" in r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_seq_len_beyond_positions_is_a_clear_error(tmp_path):
  r = spanlm_main(tmp_path, "--config.train.seq_len=1024")
  assert r.returncode == 2
  assert "seq_len=1024 exceeds the model's max_position_embeddings=512" in r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize("content,problem", [(b"", "empty"), (b"\x00\x01\x02binary\x00" * 100, "binary")])
@pytest.mark.slow
def test_bad_corpus_file_is_named(tmp_path, content, problem):
  """The file and its problem are named, with the flag that skips it (one that exists)."""
  bad = tmp_path / "corpus" / "bad.txt"
  bad.parent.mkdir()
  bad.write_bytes(content)
  with gzip.open(tmp_path / "corpus" / "good.txt.gz", "wt") as f:
    f.write("a perfectly fine paragraph of text.\n\n" * 50)
  r = spanlm_main(tmp_path / "work", f"--config.data.corpus={tmp_path}/corpus/*",
                  f"--config.data.tokenizer={ROOT}/spanlm/data/sample/sample_sp8k.model")
  assert r.returncode == 2
  assert "bad.txt" in r.stderr and problem in r.stderr.lower()
  assert "--config.data.skip_bad_files=True" in r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_missing_tokenizer_is_named(tmp_path):
  r = spanlm_main(tmp_path, "--config.data.tokenizer=/nonexistent/sp.model")
  assert r.returncode == 2
  assert "/nonexistent/sp.model" in r.stderr and "does not exist" in r.stderr


# --- one clear line for every mistake a newcomer makes (issue 15) -------------------------------

def test_missing_config_file_is_one_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "spanlm.main", "--config=experiments/nope.py:tiny",
                      f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().count("\n") == 0, r.stderr
  assert "experiments/nope.py" in r.stderr and "relative to the current directory" in r.stderr


@pytest.fixture(scope="module")
def own_corpus_run(tmp_path_factory, cli_no_plot):
  """A user's own text given as one file plus a folder holding a bad file, a short run, defaults otherwise
  (but a one-layer model: this checks data preparation and messages, and the tiny preset's 2 x 128
  layers only cost compile time; and no curves PNG: conftest.py's cli_no_plot).

  The tokenizer is trained on it (one book supports fewer than the default 8000 pieces), the bad file is
  skipped on request, and the default 50 warmup steps exceed the 4-step run.
  """
  root = tmp_path_factory.mktemp("own")
  from spanlm.data import sample
  books = sorted(sample.corpus_files())
  book = root / "book.txt"
  book.write_bytes(gzip.decompress(open([b for b in books if "pg11_" in b][0], "rb").read()))
  folder = root / "more"
  folder.mkdir()
  (folder / "earnest.txt").write_bytes(gzip.decompress(open([b for b in books if "pg844_" in b][0], "rb").read()))
  (folder / "broken.txt").write_bytes(b"\x00\x01binary\x00" * 100)
  (folder / "notes.md").write_text("not text for the corpus: only .txt and .txt.gz are read from a folder")
  args = [f"--config.data.corpus={book},{folder}", "--config.data.skip_bad_files=True",
          "--config.train.num_steps=4", "--config.train.batch_size=8", "--config.train.seq_len=64",
          "--config.train.eval_batches=1", "--config.model.num_layers=1", "--config.model.hidden_size=32",
          "--config.model.num_heads=2", "--config.model.intermediate_size=64"]
  return spanlm_main(root / "work", *args, env=cli_no_plot), root


@pytest.mark.slow
def test_own_corpus_file_and_folder_with_skipped_file_trains(own_corpus_run):
  r, root = own_corpus_run
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 4
  assert "Skipping bad corpus file" in r.stderr and "broken.txt" in r.stderr and "notes.md" not in r.stderr
  # Tokenizer training says what it does, and lowers the vocabulary to what the corpus supports.
  assert "tokenizer: read" in r.stderr
  assert "the corpus supports at most" in r.stderr and "not 8000" in r.stderr
  # The warmup (50 steps) is longer than the run: clamped, with a warning.
  assert "warmup_steps was longer than the run (train.num_steps=4); using warmup_steps=0" in r.stderr
  assert "unigram" in r.stderr  # the eval line's baseline


@pytest.mark.slow
def test_default_verbosity_has_no_library_noise(own_corpus_run, resumed_run):
  r, _ = own_corpus_run
  assert r.returncode == 0 and "tokenizer: read" in r.stderr  # a full run: preparation, training, saving
  drawn = resumed_run[1]["second"]  # a run that resumes and draws curves.png (own_corpus_run does not draw)
  assert "curves: " in drawn.stderr
  for noise in ("Unable to initialize backend", "Downloading and preparing dataset", "Dataset spanlm_corpus",
                "orbax", "Type handler registry", "Event loop is closed", "Traceback"):
    for run in (r, drawn):
      assert noise not in run.stderr + run.stdout, noise
  assert "atplotlib" not in drawn.stderr + drawn.stdout  # e.g. "Matplotlib is building the font cache"


@pytest.mark.slow
def test_uncovered_characters_warn_with_the_unknown_share(tmp_path):
  """Hebrew and emoji with the English sample tokenizer: most tokens are [UNK]; preparation says so."""
  (tmp_path / "he.txt").write_text(("שלום עולם 🙂 זה טקסט בעברית. " * 40 + "\n\n") * 20)
  r = subprocess.run([sys.executable, "tools/prepare_corpus.py", f"--input={tmp_path}/he.txt",
                      f"--tokenizer={ROOT}/spanlm/data/sample/sample_sp8k.model", f"--out={tmp_path}/out",
                      "--seq_len=32"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  share = json.loads(r.stdout.strip().splitlines()[-1])["unk_fraction"]
  assert share > 0.3
  assert f"{100 * share:.1f}% of the corpus's tokens are [UNK]" in r.stderr
