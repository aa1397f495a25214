"""BERTSUM: ROUGE hand cases, greedy oracle, trigram blocking, inputs, Noam groups, one finetune step."""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spanlm.tasks import bertsum, rouge


class WordTokenizer:
  """One id per lower-cased word (ids assigned on first use)."""

  pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4

  def __init__(self, vocab_size=256):
    self.vocab_size, self.ids = vocab_size, {}

  def encode(self, text):
    return [self.ids.setdefault(w, 5 + len(self.ids) % (self.vocab_size - 5)) for w in text.lower().split()]


# --- ROUGE ---------------------------------------------------------------------------------------

def test_rouge_hand_cases():
  c, r = "The cat sat on the mat.", "the cat is on the mat"
  scores = rouge.rouge(c, r)
  # unigrams: 5 of 6 match both ways; bigrams: {the cat, on the, the mat} = 3 of 5;
  # LCS "the cat on the mat" = 5 of 6.
  assert scores["rouge_1"] == pytest.approx(5 / 6)
  assert scores["rouge_2"] == pytest.approx(3 / 5)
  assert scores["rouge_l"] == pytest.approx(5 / 6)
  # Clipped counts: "the the the" vs "the cat": 1 match, P = 1/3, R = 1/2, F = 0.4.
  assert rouge.rouge_n(["the"] * 3, ["the", "cat"], 1)["f"] == pytest.approx(0.4)
  assert rouge.lcs_length(list("abcbdab"), list("bdcaba")) == 4  # CLRS's example
  assert rouge.rouge("", "a b")["rouge_1"] == 0.0
  p = rouge.rouge_l("a b c d".split(), "a c".split())
  assert (p["p"], p["r"]) == (0.5, 1.0)


def test_greedy_oracle_hand_case():
  sents = [s.split() for s in ("a b c", "x y z", "d e f", "a b c d")]
  # Step 1: "a b c d" (R1 F .8 + R2 F .75) beats "a b c" (.667 + .571).
  # Step 2: + "d e f" -> R1 F 12/13, R2 F 10/11: better. Step 3: nothing improves -> stop.
  assert rouge.greedy_oracle(sents, "a b c d e f".split()) == [2, 3]
  assert rouge.greedy_oracle(sents, "a b c d e f".split(), max_sentences=1) == [3]
  assert rouge.greedy_oracle(sents, "q r s".split()) == []


def test_trigram_blocking():
  sents = [s.split() for s in ("the cat sat on the mat", "so the cat sat on a chair",
                               "dogs bark loudly", "birds sing")]
  scores = [0.9, 0.8, 0.7, 0.1]
  assert rouge.select_with_trigram_blocking(sents, scores, 3) == [0, 2, 3]  # 1 repeats "the cat sat"
  assert rouge.select_with_trigram_blocking(sents, scores, 3, block=False) == [0, 1, 2]
  assert rouge.select_with_trigram_blocking(sents, [0.8, 0.9, 0.1, 0.2], 2) == [1, 3]


def test_sentence_splitter():
  text = ("Mr. Smith went to Washington. He arrived at 5 p.m. on Monday! Did he? "
          "Yes, said J. R. Jones, \"he did.\" The end\n\nNew paragraph")
  assert bertsum.split_sentences(text) == [
      "Mr. Smith went to Washington.", "He arrived at 5 p.m. on Monday!", "Did he?",
      "Yes, said J. R. Jones, \"he did.\"", "The end", "New paragraph"]


# --- inputs --------------------------------------------------------------------------------------

def _docs():
  return [([s.split() for s in ("the cat sat on the mat", "a dog barked at night", "it rained all day",
                                "the cat slept")],
           [["the", "cat", "sat", "and", "slept"]]),
          ([["short", "one"], ["another", "short", "sentence"]], [["short", "sentence"]])]


def test_features_layout_and_truncation():
  report = collections.Counter()
  feats = bertsum.featurize(_docs(), WordTokenizer(), seq_len=20, max_sentences=3, report=report)
  a = feats.arrays
  for row in range(len(feats)):
    n = int(a["sentence_mask"][row].sum())
    cls = a["cls_positions"][row, :n]
    assert (a["input_ids"][row, cls] == 2).all()
    # [CLS] s [SEP] blocks with interval segments 0, 1, 0, ...
    for k, p in enumerate(cls):
      end = cls[k + 1] if k + 1 < n else int(a["attention_mask"][row].sum())
      assert (a["segment_ids"][row, p:end] == k % 2).all() and a["input_ids"][row, end - 1] == 3
  # Doc 0: 8 + 7 tokens fit in 20, the third sentence (6) does not: truncated and counted.
  assert a["sentence_mask"][0].tolist() == [1, 1, 0]
  assert report["truncated_documents"] == 1 and report["dropped_sentences"] == 2
  # Labels are the greedy oracle's (on the whole document), for the kept sentences.
  oracle = rouge.greedy_oracle(_docs()[0][0], _docs()[0][1][0])
  assert feats.meta[0]["oracle"] == oracle
  assert a["labels"][0, :2].tolist() == [float(0 in oracle), float(1 in oracle)]
  # Fragments shorter than min_sentence_words are dropped before everything else, and counted.
  report = collections.Counter()
  feats = bertsum.featurize(_docs(), WordTokenizer(), 20, 3, min_sentence_words=3, report=report)
  assert report["dropped_short_sentences"] == 1 and feats.meta[1]["sentences"] == [["another", "short", "sentence"]]


def test_malformed_rows_are_counted(tmp_path):
  good = {"src": [["a", "b"]], "tgt": [["a"]]}
  raw = {"article": "First sentence here. Second one.", "highlights": "First sentence."}
  lines = [json.dumps(good), "{broken", json.dumps({"src": 3, "tgt": []}),
           json.dumps({"src": [], "tgt": [["x"]]}), json.dumps(raw)]
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(lines))
  report = collections.Counter()
  docs = bertsum.load_documents(str(path), report)
  assert len(docs) == 2 and report["skipped_malformed_rows"] == 2
  assert report["skipped_empty_documents"] == 1
  assert docs[1][0] == [["First", "sentence", "here."], ["Second", "one."]]
  with pytest.raises(FileNotFoundError, match="train_file"):
    bertsum.load_documents(str(tmp_path / "missing*.json"))


# --- optimisation --------------------------------------------------------------------------------

def test_noam_schedules_and_separate_groups():
  sched = bertsum.noam_schedule(2e-3, 20000)
  for step in (1, 100, 20000, 50000):
    assert float(sched(step - 1)) == pytest.approx(2e-3 * min(step ** -0.5, step * 20000 ** -1.5), rel=1e-5)
  params = {"encoder": {"w": jnp.ones(3)}, "scorer": {"w": jnp.ones(3)}}
  tx = bertsum.make_optimizer(2e-3, 20000, 0.1, 10000)
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves each weight by lr(1) (|g| / sqrt(g^2) = 1): one schedule per group.
  assert np.allclose(updates["encoder"]["w"], -2e-3 * 20000 ** -1.5, rtol=1e-3)
  assert np.allclose(updates["scorer"]["w"], -0.1 * 10000 ** -1.5, rtol=1e-3)
  # The same as optax.multi_transform of two Adams, over several steps of changing gradients.
  ref = optax.multi_transform(
      {"encoder": optax.adam(bertsum.noam_schedule(2e-3, 20000)),
       "new": optax.adam(bertsum.noam_schedule(0.1, 10000))}, bertsum.param_groups)
  s1, s2 = tx.init(params), ref.init(params)
  for k in range(4):
    g = jax.tree.map(lambda x: x * jnp.array([1.0, -2.0, 0.5]) * (k + 1) ** ((-1) ** k), params)
    u1, s1 = tx.update(g, s1, params)
    u2, s2 = ref.update(g, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(a, b, rtol=1e-5)


# --- model and one step through the fine-tuning framework ----------------------------------------

@pytest.fixture(scope="module")
def tiny_run():
  import ml_collections

  from spanlm import finetune
  from spanlm.models.bert import BertConfig

  config = finetune.finetune_config()
  with config.unlocked():
    config.bertsum = ml_collections.ConfigDict({"encoder_warmup": 10, "new_warmup": 10})
  config.train.batch_size = 8
  config.finetune.eval_batch_size = 8
  task = bertsum.make_task(config)
  feats = bertsum.featurize(_docs() * 4, WordTokenizer(), seq_len=32, max_sentences=4)
  enc = BertConfig(vocab_size=256, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32,
                   max_position_embeddings=32, dropout_rate=0.0)
  tuner = finetune.Finetuner(config, task, enc, feats.arrays, num_steps=4)
  return finetune, tuner, task, feats


def test_one_training_step_and_evaluation(tiny_run):
  finetune, tuner, task, feats = tiny_run
  from spanlm import parallel

  state = tuner.init_state(0)
  assert {"encoder", "inter_layer_0", "inter_layer_1", "inter_norm", "scorer"} <= set(state.params)
  batch = finetune._rows(feats.arrays, np.arange(8), 8)
  out = tuner.eval_step(state.params, parallel.global_batch(batch, tuner.mesh))  # compiled once, reused below
  # Padding sentence slots get no score; the loss is BCE summed over real sentences.
  assert (np.asarray(out["logits"])[batch["sentence_mask"] == 0] < -1e8).all()
  logits = np.asarray(out["logits"])
  y, m = batch["labels"], batch["sentence_mask"]
  ref = (np.logaddexp(0, logits) - y * logits) * m
  before = jax.device_get(state.params)  # the step donates its input state
  new_state, metrics = tuner.train_step(state, parallel.global_batch(batch, tuner.mesh))
  assert float(metrics["loss"]) == pytest.approx(ref.sum(1).mean(), rel=1e-4)
  assert float(metrics["learning_rate"]) == pytest.approx(2e-3 * 10 ** -1.5)  # the encoder's Noam at step 1
  # Only the encoder moves with the encoder's (much smaller) learning rate.
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), new_state.params, before)
  assert max(jax.tree.leaves(moved["encoder"])) < max(jax.tree.leaves(moved["scorer"]))
  result = finetune.evaluate(tuner, new_state.params, feats)
  for key in ("rouge_1", "rouge_2", "rouge_l", "oracle_rouge_1", "lead3_rouge_1", "rouge_mean"):
    assert 0.0 <= result[key] <= 100.0
