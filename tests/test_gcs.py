"""A gs:// workdir end to end, against a real GCS server (the `gcs` fixture in conftest.py).

gcsfs (etils.epath's gs:// backend) finds the server through STORAGE_EMULATOR_HOST and
TensorStore (Orbax's backend) through TENSORSTORE_GCS_HTTP_URL. A tiny run with
--workdir=gs://bucket/run is killed (SIGKILL) after its first checkpoint and rerun; its final
parameters must be bit-identical (tools/inspect_checkpoint.py's digest) to an uninterrupted local
run's, fine-tuning must start from the gs:// workdir, and nothing may land in a local folder
named `gs:`.

Cost: the three CLI runs (local, killed, rerun) compile the same programs, so they share a JAX
persistent compilation cache (the second and third hit it), compile with XLA's cheap CPU options,
and train on a corpus of a few hundred 16-token rows.
"""
import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
TINY = [f"--config={ROOT}/experiments/bert.py:tiny", "--config.model.num_layers=1", "--config.model.hidden_size=32",
        "--config.model.num_heads=2", "--config.model.intermediate_size=64", "--config.train.seq_len=16",
        "--config.train.batch_size=8", f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=2",
        "--config.train.log_every=2", "--config.train.eval_every=0", "--config.train.eval_batches=1",
        "--config.schedule.warmup_steps=2"]
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, cli_no_plot):
  """The environment of the CLI runs: cheap XLA CPU compiles, one shared persistent compilation
  cache, and no matplotlib (conftest.py's cli_no_plot: the curves PNG is not what this tests)."""
  base = tmp_path_factory.mktemp("cli")
  return {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA}",
          "JAX_COMPILATION_CACHE_DIR": str(base / "jax_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
          **cli_no_plot}


def _env(extra=None):
  return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **(extra or {})}


def _inspect_tool():
  spec = importlib.util.spec_from_file_location("inspect_checkpoint", os.path.join(ROOT, "tools/inspect_checkpoint.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny_corpus(folder):
  """The first 20,000 characters of a sample book: a few hundred rows of 16 tokens."""
  from spanlm.data import sample
  with gzip.open(sample.corpus_files()[0], "rt") as f:
    text = f.read()[:20000]
  out = os.path.join(folder, "book.txt")
  with open(out, "w") as f:
    f.write(text)
  return out


@pytest.mark.slow
def test_gs_workdir_survives_sigkill_and_matches_local(gcs, cli_env, tmp_path, capsys):
  from etils import epath

  from spanlm.data import sample
  corpus, tokenizer = _tiny_corpus(tmp_path), sample.tokenizer_path()

  def cmd(workdir):
    return [sys.executable, "-m", "spanlm.main", f"--workdir={workdir}", *TINY, f"--config.data.corpus={corpus}",
            f"--config.data.tokenizer={tokenizer}"]

  # The uninterrupted local reference, through the CLI as the runs below (8 devices, same compiles).
  r = subprocess.run(cmd(tmp_path / "local"), cwd=tmp_path, env=_env(cli_env), capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]

  run = "gs://bucket/run"
  log = open(tmp_path / "killed.log", "w+")
  proc = subprocess.Popen(cmd(run), cwd=tmp_path, env=_env(cli_env), stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 900  # generous: a loaded CI machine starts JAX slowly
    # Killed once step 2 is committed (Orbax's marker on object storage), i.e. mid-run: the run
    # still has to save step 4 and evaluate before its last save.
    while not (epath.Path(run) / "checkpoints" / "2" / "commit_success.txt").exists():
      assert proc.poll() is None and time.time() < deadline, (log.seek(0), log.read()[-3000:])[1]
      time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not (epath.Path(run) / "checkpoints" / str(STEPS)).exists()  # it really stopped mid-run
  r = subprocess.run(cmd(run), cwd=tmp_path, env=_env(cli_env), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from {run}/checkpoints at step" in r.stderr

  # tools/inspect_checkpoint.py, run here (no third JAX start-up): the same digest.
  assert _inspect_tool().main([f"--workdir={run}"]) == 0
  remote, local = json.loads(capsys.readouterr().out), _inspect_tool().inspect(str(tmp_path / "local"))
  assert remote["step"] == local["step"] == STEPS
  assert remote["params_sha256"] == local["params_sha256"]  # bit-identical to the uninterrupted run
  assert remote["workdir"] == run and remote["config"]["train"]["num_steps"] == STEPS
  assert remote["params_checksum_ok"] is True
  rows = [json.loads(line) for line in (epath.Path(run) / "metrics.jsonl").read_text().splitlines()]
  # Each logged step once: the rerun drops the rows the killed run wrote after its checkpoint.
  assert sorted(r["step"] for r in rows if "train/loss" in r) == list(range(2, STEPS + 1, 2))

  # Fine-tuning starts from the gs:// workdir: its encoder is the pretrained one, bit for bit.
  from spanlm import checkpoint, finetune, resilience
  c = finetune.finetune_config()
  c.init_checkpoint = run
  _, params, _ = finetune.load_encoder(c)
  raw, _ = checkpoint.read_raw(tmp_path / "local" / "checkpoints" / str(STEPS))
  assert resilience.tree_digest(params) == resilience.tree_digest(raw["params"]["encoder"])

  for folder in (ROOT, str(tmp_path), os.getcwd()):
    assert not os.path.exists(os.path.join(folder, "gs:")), folder


def _toy_sst(root):
  """A toy SST-2 (the label word is in the sentence) and a 16-word vocabulary, written to `root`."""
  import numpy as np
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the", "was", "very", "a",
           "plot", "acting", "fine", "##s"]
  rng = np.random.default_rng(0)
  (root / "SST-2").mkdir(parents=True)
  for split, n in (("train", 32), ("dev", 16), ("test", 6)):
    lines = ["index\tsentence" if split == "test" else "sentence\tlabel"]
    for i in range(n):
      y = int(rng.integers(2))
      words = list(rng.choice(vocab[7:14], size=int(rng.integers(2, 8)))) + ["good" if y else "bad"]
      lines.append(f"{i}\t{' '.join(words)}" if split == "test" else f"{' '.join(words)}\t{y}")
    (root / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
  (root / "vocab.txt").write_text("\n".join(vocab) + "\n")


@pytest.mark.slow  # ~20 s: a 2-step fine-tune whose checkpoints, model/ and outputs go to the server
def test_finetune_into_a_gs_workdir(gcs, tmp_path, monkeypatch):
  from etils import epath

  from spanlm import convert, finetune
  _toy_sst(tmp_path)
  monkeypatch.chdir(tmp_path)  # a URL taken for a relative path would land in ./gs:
  c = finetune.finetune_config()
  c.task.name, c.task.data_dir, c.data.tokenizer = "sst2", str(tmp_path / "SST-2"), str(tmp_path / "vocab.txt")
  c.model.size = "tiny"
  c.model.num_layers, c.model.hidden_size, c.model.num_heads, c.model.intermediate_size = 1, 32, 2, 64
  c.train.seq_len, c.train.batch_size, c.train.log_every = 16, 16, 1
  c.finetune.num_epochs, c.finetune.eval_batch_size = 1, 16
  # SGD without momentum: no optimizer state, so the checkpoint (one zarr store per array on the
  # emulator) holds half the arrays Adam's would.
  c.optimizer.name, c.optimizer.momentum, c.optimizer.learning_rate = "sgd", 0.0, 0.1
  run = "gs://bucket/ft"
  out = finetune.run(c, run)
  assert out["complete"] and out["steps"] == 2
  root = epath.Path(run)
  results = json.loads((root / "results.json").read_text())
  assert results["steps"] == 2 and "best/accuracy" in results
  assert json.loads((root / "config.json").read_text())["task"]["name"] == "sst2"
  assert (root / "checkpoints" / "2" / "commit_success.txt").exists()
  assert [json.loads(r)["step"] for r in (root / "metrics.jsonl").read_text().splitlines()][:2] == [1, 2]
  assert results["prediction_files"] == [f"{run}/predictions_test/SST-2.tsv"]
  rows = (root / "predictions_test" / "SST-2.tsv").read_text().splitlines()
  assert rows[0] == "index\tprediction" and len(rows) == 7
  assert convert.is_converted(f"{run}/model")
  cfg, params, _ = convert.load_converted(f"{run}/model")  # the best encoder, readable from the bucket
  assert cfg.num_layers == 1 and params["embeddings"]["word_embeddings"].shape == (16, 32)
  for folder in (ROOT, str(tmp_path), os.getcwd()):
    assert not os.path.exists(os.path.join(folder, "gs:")), folder


def test_task_data_on_gs_reads_as_local(gcs, tmp_path, monkeypatch):
  """Fine-tuning input read from gs:// (GLUE TSVs through config.task.data_dir and $GLUE_DIR, a
  SQuAD JSON, a BertSum glob) gives exactly what the local copies give; a missing gs:// file is the
  same one line as a missing local one."""
  import numpy as np
  from etils import epath

  from spanlm import finetune, paths
  from spanlm.data.wordpiece import WordPieceTokenizer
  from spanlm.tasks import bertsum, get_task, squad
  _toy_sst(tmp_path)
  monkeypatch.chdir(tmp_path)  # a URL taken for a relative path would land in ./gs:
  for split in ("train", "dev", "test"):
    epath.Path(f"gs://bucket/glue/SST-2/{split}.tsv").write_bytes((tmp_path / "SST-2" / f"{split}.tsv").read_bytes())
  tok = WordPieceTokenizer((tmp_path / "vocab.txt").read_text().split())
  c = finetune.finetune_config()
  c.task.name, c.task.data_dir = "sst2", str(tmp_path / "SST-2")
  local = {s: get_task("sst2", c).load(s, tok, 16) for s in ("train", "test")}
  c.task.data_dir = ""
  monkeypatch.setenv("GLUE_DIR", "gs://bucket/glue")  # the task's folder under $GLUE_DIR
  remote = {s: get_task("sst2", c).load(s, tok, 16) for s in ("train", "test")}
  for s in local:
    assert local[s].arrays.keys() == remote[s].arrays.keys() and local[s].report == remote[s].report
    for k in local[s].arrays:
      np.testing.assert_array_equal(local[s].arrays[k], remote[s].arrays[k])
    assert local[s].meta["index"] == remote[s].meta["index"]
  assert local["train"].report["rows"] == 32 and local["test"].report["rows"] == 6
  c.task.data_dir = "gs://bucket/glue/SST-2"
  epath.Path("gs://bucket/glue/SST-2/dev.tsv").unlink()
  with pytest.raises(FileNotFoundError, match=r"^gs://bucket/glue/SST-2/dev\.tsv not found$"):
    get_task("sst2", c).load("dev", tok, 16)
  # MNLI's diagnostic set is `../diagnostic/diagnostic.tsv` from its folder: resolved on gs:// too.
  assert str(paths.path("gs://bucket/glue/MNLI/../diagnostic/diagnostic.tsv")) == \
      "gs://bucket/glue/diagnostic/diagnostic.tsv"

  squad_data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
      {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]}]}]}]}
  (tmp_path / "dev.json").write_text(json.dumps(squad_data))
  epath.Path("gs://bucket/squad/dev.json").write_text(json.dumps(squad_data))
  raw, examples = squad.load_squad("gs://bucket/squad/dev.json")
  assert raw == squad_data and examples == squad.load_squad(str(tmp_path / "dev.json"))[1]
  assert examples[0].answer_start == 12
  with pytest.raises(FileNotFoundError, match=r"SQuAD file 'gs://bucket/squad/train\.json' not found"):
    squad.load_squad("gs://bucket/squad/train.json")

  docs = [{"src": [["a", "b"], ["c"]], "tgt": [["a"]]}, {"src": [["d"]], "tgt": [["d"]]}]
  for i, doc in enumerate(docs):
    epath.Path(f"gs://bucket/cnndm/cnndm.train.{i}.json").write_text(json.dumps([doc]))
    (tmp_path / f"cnndm.train.{i}.json").write_text(json.dumps([doc]))
  assert bertsum.load_documents("gs://bucket/cnndm/cnndm.train.*.json") == \
      bertsum.load_documents(str(tmp_path / "cnndm.train.*.json")) == [(d["src"], d["tgt"]) for d in docs]
  with pytest.raises(FileNotFoundError, match=r"no summarisation data at 'gs://bucket/cnndm/none\.\*\.json'"):
    bertsum.load_documents("gs://bucket/cnndm/none.*.json")
  assert not os.path.exists(tmp_path / "gs:")


@pytest.mark.slow
def test_bad_urls_are_one_line(gcs, tmp_path):
  from spanlm import workdir
  with pytest.raises(ValueError, match=r"s3://b/run: the URL scheme s3:// is not supported"):
    workdir.Workdir("s3://b/run")
  with pytest.raises(ValueError, match=r"cannot access gs://no-such-bucket/run .*GOOGLE_APPLICATION_CREDENTIALS"):
    workdir.Workdir("gs://no-such-bucket/run").check_writable()
  r = subprocess.run([sys.executable, "-m", "spanlm.main", "--workdir=gs://no-such-bucket/run", *TINY],
                     cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: cannot access gs://no-such-bucket/run") and "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "gs:")
  # The converted-checkpoint entry points check the bucket first (paths.check_bucket): an absent one
  # is that one line, not "not a converted checkpoint" nor a write failing deep inside gcsfs/TensorStore.
  from spanlm import convert
  with pytest.raises(ValueError, match=r"^cannot access gs://no-such-bucket/conv .*does not exist.*"
                                       r"GOOGLE_APPLICATION_CREDENTIALS"):
    convert.is_converted("gs://no-such-bucket/conv")
  with pytest.raises(ValueError, match=r"^cannot access gs://no-such-bucket/out .*GOOGLE_APPLICATION_CREDENTIALS"):
    convert.import_hf(str(tmp_path), "gs://no-such-bucket/out")  # before --src is even looked at
  convert.is_converted("gs://bucket/conv-none")  # a reachable bucket passes (False: nothing there)


@pytest.mark.slow  # ~10 s: JAX, Orbax and tokenization against the server
def test_converted_checkpoint_and_glob_corpus_on_gs(gcs, tmp_path):
  """tools/import_checkpoint.py's conversions with gs:// --src/--out, and a raw-text glob on gs://."""
  import flax.linen as nn
  import jax
  import numpy as np
  from etils import epath
  from safetensors.numpy import save_file

  from spanlm import convert
  from spanlm.data import corpus as corpus_lib
  from spanlm.data import prepare, sample
  from spanlm.models.bert import BertConfig, BertEncoder

  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(27)]
  cfg = BertConfig(vocab_size=len(vocab), num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32,
                   max_position_embeddings=24, use_pooler=True, dropout_rate=0.0)
  params = jax.tree.map(np.asarray, nn.meta.unbox(
      BertEncoder(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32))["params"]))
  hf = tmp_path / "hf"
  hf.mkdir()
  save_file(convert.params_to_hf(params, cfg), str(hf / "model.safetensors"))
  (hf / "config.json").write_text(json.dumps(convert.config_to_hf(cfg)))
  (hf / "vocab.txt").write_text("\n".join(vocab) + "\n")

  # HF folder -> gs:// converted checkpoint -> gs:// HF folder -> local converted checkpoint.
  assert convert.import_hf(str(hf), "gs://bucket/conv") == "gs://bucket/conv"
  assert convert.is_converted("gs://bucket/conv")
  _, remote, tok = convert.load_converted("gs://bucket/conv")
  assert tok.cls_id == 2
  from spanlm import finetune
  c = finetune.finetune_config()
  c.init_checkpoint = "gs://bucket/conv"  # fine-tuning starts from it
  _, encoder, _ = finetune.load_encoder(c)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(encoder)))
  convert.export_hf("gs://bucket/conv", "gs://bucket/hf")
  assert epath.Path("gs://bucket/hf/model.safetensors").exists()
  convert.import_hf("gs://bucket/hf", str(tmp_path / "back"))
  _, back, _ = convert.load_converted(str(tmp_path / "back"))
  for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(remote), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)

  # Raw text on gs://: a glob is resolved, read and prepared like a local one.
  with gzip.open(sample.corpus_files()[0], "rt") as f:
    text = f.read()
  (tmp_path / "books").mkdir()
  for i in range(2):  # the same two books, on gs:// and locally
    epath.Path(f"gs://bucket/books/book{i}.txt").write_text(text[i * 6000:(i + 1) * 6000])
    (tmp_path / "books" / f"book{i}.txt").write_text(text[i * 6000:(i + 1) * 6000])
  epath.Path("gs://bucket/books/notes.md").write_text("not matched")
  files = corpus_lib.resolve_files("gs://bucket/books/*.txt")
  assert files == ["gs://bucket/books/book0.txt", "gs://bucket/books/book1.txt"]
  assert corpus_lib.resolve_files("gs://bucket/books") == files  # a folder: its .txt files
  assert [len(d.paragraphs) > 0 for d in corpus_lib.read_documents(files)] == [True, True]
  out = prepare.ensure_prepared("gs://bucket/books/*.txt", tmp_path / "wd", 16, tokenizer=sample.tokenizer_path())
  local = prepare.ensure_prepared(str(tmp_path / "books"), tmp_path / "wd_local", 16, tokenizer=sample.tokenizer_path())
  a, b = prepare.load_prepared(prepare.local_copy(out)), prepare.load_prepared(local)
  assert len(a.train) == len(b.train) > 0
  np.testing.assert_array_equal(a.train[len(a.train) - 1]["input_ids"], b.train[len(b.train) - 1]["input_ids"])
  with pytest.raises(ValueError, match=r"^s3://b/\*\.txt: the URL scheme s3:// is not supported"):
    corpus_lib.resolve_files("s3://b/*.txt")
  with pytest.raises(FileNotFoundError, match=r"No files match 'gs://bucket/none/\*\.txt'"):
    corpus_lib.resolve_files("gs://bucket/none/*.txt")


@pytest.mark.slow  # ~5 s on 2 cores: a model_summary.py subprocess
def test_tool_and_report_outputs_on_gs(gcs, tmp_path, monkeypatch):
  """A gs:// --out of tools/reproduce.py (report.md and its PNGs, through repro.run_claim) and of
  tools/model_summary.py (its JSON) lands on the server, and nothing in a local folder named `gs:`."""
  import types

  from etils import epath

  from spanlm import repro
  from spanlm.repro import report

  monkeypatch.chdir(tmp_path)

  def run(out, smoke=False, log=print):  # a claim without training: one plot and a verdict
    report.plot_bands(f"{out}/fake_curves.png", {"arm": ([0, 1, 2], [[3.0, 2.0, 1.0], [3.1, 2.2, 1.1]])},
                      xlabel="step", ylabel="loss", title="fake")
    return report.Report(claim="fake", title="Fake", statement="s", mirrors="m", settings={"steps": 2},
                         table=[["arm", "loss"], ["arm", report.pm([1.0, 1.1])]], verdict="inconclusive",
                         reason="r", figures=["fake_curves.png"])

  monkeypatch.setitem(sys.modules, "fake_claim_for_test_gcs", types.SimpleNamespace(run=run))
  monkeypatch.setitem(repro.CLAIMS, "fake", "fake_claim_for_test_gcs")
  rep = repro.run_claim("fake", "gs://bucket/repro/fake", smoke=True)
  assert epath.Path("gs://bucket/repro/fake/report.md").read_text() == rep.markdown()
  assert "![fake_curves.png](fake_curves.png)" in rep.markdown()
  assert epath.Path("gs://bucket/repro/fake/fake_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match=r"^cannot access gs://no-such-bucket/repro .*GOOGLE_APPLICATION_CREDENTIALS"):
    repro.run_claim("fake", "gs://no-such-bucket/repro")

  r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "model_summary.py"),
                      f"--config={ROOT}/experiments/bert.py:tiny", "--out=gs://bucket/summary/tiny.json"],
                     cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  written = epath.Path("gs://bucket/summary/tiny.json").read_text()
  assert written == r.stdout[:r.stdout.rindex("}") + 1] + "\n"  # the printed JSON, as a local --out has it
  assert json.loads(written)["parameters"]["encoder"] > 0
  assert not os.path.exists(tmp_path / "gs:")
