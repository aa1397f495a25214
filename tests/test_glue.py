"""GLUE: official metrics against hand-computed values, TSV parsing of bad rows, and the fine-tuning loop."""

import json
import os

import numpy as np
import pytest

from spanlm import finetune
from spanlm.data.wordpiece import WordPieceTokenizer
from spanlm.tasks import get_task
from spanlm.tasks import glue


def test_metrics_on_hand_computed_cases():
  gold = np.array([1, 1, 1, 0, 0])
  pred = np.array([1, 1, 0, 1, 0])  # TP=2 FN=1 FP=1 TN=1
  assert glue.accuracy(pred, gold) == pytest.approx(3 / 5)
  assert glue.f1_score(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
  assert glue.matthews_corr(pred, gold) == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))
  assert glue.matthews_corr(np.ones(5), gold) == 0.0  # an empty marginal: defined as 0
  assert glue.f1_score(np.zeros(5), gold) == 0.0
  assert glue.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
  assert glue.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  # x = [1, 2, 3, 4] vs y = [1, 3, 2, 4]: d = (0, 1, 1, 0), rho = 1 - 6*2/(4*15) = 0.8
  assert glue.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_metrics_agree_with_scipy_and_sklearn():
  stats = pytest.importorskip("scipy.stats")
  skm = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  gold, pred = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
  assert glue.matthews_corr(pred, gold) == pytest.approx(skm.matthews_corrcoef(gold, pred))
  assert glue.f1_score(pred, gold) == pytest.approx(skm.f1_score(gold, pred))
  x, y = rng.normal(size=100), np.round(rng.normal(size=100), 1)  # rounding makes ties
  assert glue.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
  assert glue.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the", "was", "very", "a",
         "plot", "acting", "fine", "##s"]


def _tok():
  return WordPieceTokenizer(VOCAB)


def test_bad_rows_are_counted_not_fatal(tmp_path):
  d = tmp_path / "STS-B"
  d.mkdir()
  head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
  row = "{i}\tg\tf\ty\to\ts\ts\tthe movie\t{b}\t{s}\n"
  (d / "dev.tsv").write_text(head + row.format(i=0, b="a good movie", s="3.5") + "0\ttoo\tfew\n"
                             + row.format(i=2, b="bad", s="high") + row.format(i=3, b="the " * 100, s="1"))
  c = finetune.finetune_config()
  c.task.name, c.task.data_dir = "stsb", str(d)
  f = get_task("stsb", c).load("dev", _tok(), 16)
  assert f.report == {"rows": 2, "skipped_malformed": 1, "skipped_bad_label": 1, "truncated": 1}
  assert f.arrays["labels"].tolist() == [3.5, 1.0] and f.meta["index"] == ["0", "3"]
  assert f.arrays["attention_mask"][1].sum() == 16


def test_pair_packing_truncates_longest_first():
  tok = _tok()
  ids, seg, mask, cut = glue.pack(tok, [5] * 6, [6] * 2, 9)  # budget 6: a is cut to 4
  assert cut and ids == [2, 5, 5, 5, 5, 3, 6, 6, 3] and seg == [0] * 6 + [1] * 3 and sum(mask) == 9
  ids, seg, mask, cut = glue.pack(tok, [5], None, 5)
  assert not cut and ids == [2, 5, 3, 0, 0] and mask == [1, 1, 1, 0, 0]


def _write_sst(d, n, rng, labelled=True):
  lines = ["sentence\tlabel" if labelled else "index\tsentence"]
  filler = ["the", "movie", "was", "very", "a", "plot", "acting", "fine", "plots"]
  for i in range(n):
    y = int(rng.integers(2))
    words = list(rng.choice(filler, size=int(rng.integers(2, 7)))) + ["good" if y else "bad"]
    rng.shuffle(words)
    lines.append(f"{' '.join(words)}\t{y}" if labelled else f"{i}\t{' '.join(words)}")
  lines.append("a row\twith\ttoo many columns")  # counted, skipped
  d.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def sst_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("glue")
  data = root / "SST-2"
  data.mkdir()
  rng = np.random.default_rng(0)
  _write_sst(data / "train.tsv", 256, rng)
  _write_sst(data / "dev.tsv", 64, rng)
  _write_sst(data / "test.tsv", 20, rng, labelled=False)
  (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  c = finetune.finetune_config()
  c.task.name, c.task.data_dir = "sst2", str(data)
  c.data.tokenizer = str(root / "vocab.txt")
  c.model.size = "tiny"
  c.model.num_layers, c.model.hidden_size, c.model.num_heads, c.model.intermediate_size = 1, 32, 2, 64
  c.model.dropout_rate = 0.0
  c.train.seq_len, c.train.batch_size, c.train.log_every = 16, 16, 8
  c.finetune.num_epochs, c.finetune.eval_batch_size = 3, 16
  c.optimizer.learning_rate = 3e-3
  workdir = root / "run"
  return finetune.run(c, str(workdir)), workdir


@pytest.mark.slow
def test_finetuning_learns_a_toy_sentiment_task(sst_run):
  result, workdir = sst_run
  assert result["steps"] == 3 * (256 // 16)
  assert result["best/accuracy"] >= 0.9  # the label is the presence of 'good' vs 'bad'
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  evals = [r for r in rows if "eval/accuracy" in r]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(evals) == 3 and losses[-1] < losses[0]
  lines = open(result["prediction_files"][0]).read().splitlines()
  assert lines[0] == "index\tprediction" and len(lines) == 21 and lines[1].startswith("0\t")
  assert os.path.isfile(workdir / "model" / "spanlm_model.json")


def test_saved_encoder_reloads_and_merges(sst_run):
  from spanlm import convert
  _, workdir = sst_run
  cfg, params, tok = convert.load_converted(str(workdir / "model"))
  assert cfg.hidden_size == 32 and tok.cls_id == 2
  fresh = {"encoder": {k: np.zeros_like(v) if not isinstance(v, dict) else v for k, v in params.items()},
           "classifier": {"bias": np.zeros(2)}}
  merged = finetune.merge_encoder(fresh, params)
  np.testing.assert_array_equal(merged["encoder"]["embeddings"]["word_embeddings"],
                                params["embeddings"]["word_embeddings"])
  bad = dict(params, embeddings=dict(params["embeddings"], word_embeddings=np.zeros((3, 32))))
  with pytest.raises(ValueError, match="word_embeddings"):
    finetune.merge_encoder({"encoder": params}, bad)


def test_unknown_task_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown config.task.name"):
    get_task("nosuchtask", finetune.finetune_config())


def _glue_config(name, d):
  c = finetune.finetune_config()
  c.task.name, c.task.data_dir = name, str(d)
  return c


def test_test_ids_come_from_the_files_own_id_column(tmp_path):
  d = tmp_path / "QQP"
  d.mkdir()
  (d / "test.tsv").write_text("id\tquestion1\tquestion2\n"
                              "7\tthe movie\ta plot\n"
                              "8\tbroken row\n"  # malformed: skipped, and must not shift later ids
                              "12\tgood\tbad\n")
  f = get_task("qqp", _glue_config("qqp", d)).load("test", _tok(), 16)
  assert f.meta["index"] == ["7", "12"] and f.report["skipped_malformed"] == 1


def test_mnli_writes_matched_mismatched_and_ax(tmp_path):
  d = tmp_path / "MNLI"
  d.mkdir()
  (tmp_path / "diagnostic").mkdir()
  head = "index\tsentence1\tsentence2\n"
  for path in (d / "test_matched.tsv", d / "test_mismatched.tsv", tmp_path / "diagnostic" / "diagnostic.tsv"):
    path.write_text(head + "0\tthe movie\ta plot\n1\tgood\tbad\n")
  task = get_task("mnli", _glue_config("mnli", d))
  assert task.predict_splits() == ("test", "test_mismatched", "ax")
  written = []
  for split in task.predict_splits():
    features = task.load(split, _tok(), 16)
    out = tmp_path / "run" / task.prediction_dir(split)
    written += task.write_predictions(np.array([1, 2]), features, str(out))
  assert [os.path.basename(p) for p in written] == ["MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"]
  assert open(written[2]).read() == "index\tprediction\n0\tentailment\n1\tneutral\n"


def test_a_file_that_is_not_utf8_names_the_file(tmp_path):
  d = tmp_path / "SST-2"
  d.mkdir()
  (d / "dev.tsv").write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\t0\n")
  with pytest.raises(ValueError, match=r"SST-2/dev.tsv line 3: byte 0xFF is not UTF-8"):
    get_task("sst2", _glue_config("sst2", d)).load("dev", _tok(), 16)


def test_glue_submission_zips_the_eleven_files(tmp_path, capsys):
  import sys
  import zipfile
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
  import glue_submission

  runs = []
  for stems in (["CoLA", "SST-2", "MRPC", "QQP", "STS-B", "QNLI", "RTE", "WNLI"], ["MNLI-m", "MNLI-mm", "AX"]):
    run = tmp_path / stems[0]
    (run / "predictions_test").mkdir(parents=True)
    for stem in stems:
      value = {"STS-B": "3.250", "QNLI": "entailment", "RTE": "not_entailment", "MNLI-m": "neutral",
               "MNLI-mm": "contradiction", "AX": "entailment"}.get(stem, "1")
      (run / "predictions_test" / f"{stem}.tsv").write_text(f"index\tprediction\n0\t{value}\n1\t{value}\n")
    runs.append(str(run))
  out = tmp_path / "submission.zip"
  assert glue_submission.main(runs + [f"--out={out}"]) == 0
  names = zipfile.ZipFile(out).namelist()
  assert sorted(names) == sorted(f"{s}.tsv" for s in glue_submission.TEST_ROWS)  # flat, eleven files
  # A missing file and a bad label are refused.
  assert glue_submission.main(runs[:1] + [f"--out={tmp_path / 'x.zip'}"]) == 2
  assert "missing MNLI-m.tsv, MNLI-mm.tsv, AX.tsv" in capsys.readouterr().err
  bad = tmp_path / "CoLA" / "predictions_test" / "RTE.tsv"
  bad.write_text("index\tprediction\n0\tneutral\n")
  assert glue_submission.main(runs + [f"--out={tmp_path / 'y.zip'}"]) == 2
  assert "prediction 'neutral' is not one of ('entailment', 'not_entailment')" in capsys.readouterr().err
