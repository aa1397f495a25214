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


# --- ROUGE, oracle, blocking (PreSumm) -----------------------------------------------------------

def presumm_greedy_selection(doc_sent_list, abstract_sent_list, summary_size):
  """nlpyang/PreSumm src/prepro/data_builder.py greedy_selection, transcribed (the reference)."""
  import re

  def _rouge_clean(s):
    return re.sub(r"[^a-zA-Z0-9 ]", "", s)

  def _ngrams(n, words):
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

  def cal_rouge(evaluated, reference):
    overlap = len(evaluated & reference)
    p = overlap / len(evaluated) if evaluated else 0.0
    r = overlap / len(reference) if reference else 0.0
    return 2.0 * ((p * r) / (p + r + 1e-8))

  max_rouge = 0.0
  abstract = _rouge_clean(" ".join(sum(abstract_sent_list, []))).split()
  sents = [_rouge_clean(" ".join(s)).split() for s in doc_sent_list]
  e1, e2 = [_ngrams(1, s) for s in sents], [_ngrams(2, s) for s in sents]
  r1, r2 = _ngrams(1, abstract), _ngrams(2, abstract)
  selected = []
  for _ in range(summary_size):
    cur_max, cur_id = max_rouge, -1
    for i in range(len(sents)):
      if i in selected:
        continue
      c = selected + [i]
      score = cal_rouge(set.union(*[e1[j] for j in c]), r1) + cal_rouge(set.union(*[e2[j] for j in c]), r2)
      if score > cur_max:
        cur_max, cur_id = score, i
    if cur_id == -1:
      return selected
    selected.append(cur_id)
    max_rouge = cur_max
  return sorted(selected)


def test_rouge_is_rouge_score_stemmed_with_lsum():
  # Stemming: "cats" ~ "cat", "sat" = "sat"; unigrams 5 of 6 candidate / 5 of 9 reference tokens.
  scores = rouge.rouge(["the cats sat", "the dog ran"], ["the cat sat on a mat", "a dog ran"])
  p, r = 5 / 6, 5 / 9
  assert scores["rouge_1"] == pytest.approx(2 * p * r / (p + r))
  # ROUGE-Lsum: union LCS per reference sentence: "the cat sat" (3) + "dog ran" (2) = 5 hits.
  assert scores["rouge_lsum"] == pytest.approx(2 * p * r / (p + r))
  # Summary-level LCS depends on the sentence order of the candidate.
  assert rouge.rouge(["b c", "a"], ["a b c"])["rouge_lsum"] == rouge.rouge(["a", "b c"], ["a b c"])["rouge_lsum"]


def test_greedy_oracle_equals_presumms():
  rng = np.random.default_rng(0)
  words = "the cat u.s. sat on mat dog barked at night it rained all day don't stop".split()
  for _ in range(30):
    doc = [list(rng.choice(words, size=int(rng.integers(1, 9)))) for _ in range(int(rng.integers(1, 8)))]
    ref = [list(rng.choice(words, size=int(rng.integers(2, 8)))) for _ in range(2)]
    # (PreSumm returns an early stop's selection unsorted; only the set makes the labels.)
    assert rouge.greedy_oracle(doc, ref) == sorted(presumm_greedy_selection(doc, ref, 3))
  # Hand case: n-gram *sets* (a repeated "a" counts once) and the cleaning ("u.s." -> "us").
  sents = [s.split() for s in ("a a a", "b c", "u.s. d")]
  ref = [["a", "us", "d"]]
  assert rouge.greedy_oracle(sents, ref) == [0, 2]
  assert rouge.greedy_oracle(sents, [["q"]]) == []


def test_trigram_blocking_in_score_order():
  sents = [s.split() for s in ("the cat sat on the mat", "so the cat sat on a chair",
                               "dogs bark loudly", "birds sing")]
  scores = [0.7, 0.8, 0.9, 0.1]
  # PreSumm: by score, 0 repeats "the cat sat" of 1 and is skipped; summary in score order.
  assert rouge.select_with_trigram_blocking(sents, scores, 3) == [2, 1, 3]
  assert rouge.select_with_trigram_blocking(sents, scores, 3, document_order=True) == [1, 2, 3]
  assert rouge.select_with_trigram_blocking(sents, scores, 3, block=False) == [2, 1, 0]


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
  feats = bertsum.featurize(_docs(), WordTokenizer(), seq_len=20, max_sentences=3, min_sentence_tokens=0,
                            report=report)
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
  oracle = rouge.greedy_oracle(_docs()[0][0], _docs()[0][1])
  assert feats.meta[0]["oracle"] == oracle
  assert a["labels"][0, :2].tolist() == [float(0 in oracle), float(1 in oracle)]
  # PreSumm: sentences of at most min_sentence_tokens tokens are dropped (counted), after the oracle.
  report = collections.Counter()
  feats = bertsum.featurize(_docs(), WordTokenizer(), 20, 3, min_sentence_tokens=2, report=report)
  assert report["dropped_short_sentences"] == 1 and feats.meta[1]["sentences"] == [["another", "short", "sentence"]]


def test_the_oracle_sees_sentences_the_length_filter_drops():
  # The best oracle sentence is short: PreSumm picks it before filtering, so its label is lost with
  # it and the next-best sentence is not promoted.
  doc = [["cat", "sat"], "a dog barked at the night sky".split(), "it rained on the cat all day".split()]
  feats = bertsum.featurize([(doc, [["cat", "sat"]])], WordTokenizer(), 64, 4, min_sentence_tokens=5)
  assert feats.meta[0]["oracle_all"] == [["cat", "sat"]]
  assert feats.meta[0]["sentences"] == doc[1:] and feats.arrays["labels"][0].tolist() == [0, 0, 0, 0]
  # Training documents left with fewer than 3 sentences are skipped (PreSumm's min_src_nsents).
  report = collections.Counter()
  with pytest.raises(ValueError, match="skipped_short_documents=1"):
    bertsum.featurize([(doc, [["cat"]])], WordTokenizer(), 64, 4, training=True, report=report)


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
  from spanlm import finetune
  from spanlm.models.bert import BertConfig

  config = finetune.finetune_config("bertsum")
  config.bertsum.encoder_warmup = config.bertsum.new_warmup = 10
  config.train.batch_size = 8
  config.finetune.eval_batch_size = 8
  task = bertsum.make_task(config)
  feats = bertsum.featurize(_docs() * 4, WordTokenizer(), seq_len=32, max_sentences=4, min_sentence_tokens=0)
  enc = BertConfig(vocab_size=256, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32,
                   max_position_embeddings=32, dropout_rate=0.0)
  tuner = finetune.Finetuner(config, task, enc, feats.arrays, num_steps=4)
  return finetune, tuner, task, feats


@pytest.mark.slow
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
  for key in ("rouge_1", "rouge_2", "rouge_lsum", "oracle_rouge_1", "lead3_rouge_1", "rouge_mean"):
    assert 0.0 <= result[key] <= 100.0
