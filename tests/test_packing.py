"""Sequence packing: row layouts, and a packed row computes what its documents compute alone."""

import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spanlm
from spanlm import parallel
from spanlm.objectives import losses as objectives
from spanlm.objectives import masking
from spanlm.data import pipeline, prepare, sample
from spanlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID
from spanlm.models.bert import config_for
from spanlm.models.heads import BertForPretraining

L = 32


def random_docs(seed=0, lengths=(3, 50, 7, 29, 1, 14, 60, 9, 22)):
  rng = np.random.default_rng(seed)
  return [rng.integers(5, 200, size=n).astype(np.int32) for n in lengths]


def segments(row, packing_ids):
  """The token runs of each packing id (1, 2, ...) of one row."""
  return [row[packing_ids == k] for k in range(1, packing_ids.max() + 1)]


def test_packed_rows_hold_every_token_once_with_restarting_positions():
  docs = random_docs()
  rows = prepare.pack_rows(docs, L, "packed")
  pieces = []
  for ids, pos, pack in zip(rows["input_ids"], rows["position_ids"], rows["packing_ids"]):
    assert (pack == 0).sum() == (ids == PAD_ID).sum()  # padding is exactly packing id 0
    assert np.all(np.diff(pack[pack > 0]) >= 0)  # segments are contiguous
    for seg, seg_pos in zip(segments(ids, pack), segments(pos, pack)):
      assert seg[0] == CLS_ID and seg[-1] == SEP_ID
      np.testing.assert_array_equal(seg_pos, np.arange(len(seg)))
      pieces.append(tuple(seg[1:-1]))
  expected = [tuple(t[i:i + L - 2]) for t in docs for i in range(0, len(t), L - 2)]
  assert sorted(pieces) == sorted(expected)
  # Packing removes padding: fewer rows than one-document-per-row.
  doc_rows = prepare.pack_rows(docs, L, "document")["input_ids"]
  assert len(rows["input_ids"]) < len(doc_rows)
  assert (prepare.packing_stats(rows["input_ids"])["pad_fraction"]
          < prepare.packing_stats(doc_rows)["pad_fraction"])


def test_full_sentences_joins_documents_with_sep():
  docs = random_docs(lengths=(10, 5, 40))
  rows = prepare.pack_rows(docs, L, "full_sentences")["input_ids"]
  stream = np.concatenate([docs[0], [SEP_ID], docs[1], [SEP_ID], docs[2]])
  # Each row is [CLS] body [SEP]: the bodies concatenate to the [SEP]-joined stream.
  body = np.concatenate([r[1:][: (r[1:] != PAD_ID).sum() - 1] for r in rows])
  np.testing.assert_array_equal(body, stream)
  assert (rows[:-1] != PAD_ID).all()  # only the last row has padding


@pytest.fixture(scope="module")
def model_and_params():
  cfg = config_for("tiny", vocab_size=256, dropout_rate=0.0, max_position_embeddings=64)
  model = BertForPretraining(cfg, sbo=True, sbo_max_targets=16)
  ids = jnp.zeros((1, L), jnp.int32)
  pos = jnp.zeros((1, 4), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), ids, ids, ids > 0, pos, pos, pos + 1)["params"]
  return model, params


@pytest.mark.slow
def test_packed_row_equals_documents_run_alone(model_and_params):
  """Hidden states, MLM and SBO losses of a packed row = those of its documents, one per row."""
  model, params = model_and_params
  docs = random_docs(1, lengths=(6, 11, 9))  # 8 + 13 + 11 = 32 tokens: one full packed row
  packed = {k: jnp.asarray(v) for k, v in prepare.pack_rows(docs, L, "packed").items()}
  assert len(packed["input_ids"]) == 1
  alone = jnp.asarray(prepare.pack_rows(docs, L, "document")["input_ids"])  # [CLS] doc [SEP] [PAD]..
  offsets = np.cumsum([0] + [len(d) + 2 for d in docs])

  def encode(ids, **kw):
    return model.apply({"params": params}, ids, jnp.zeros_like(ids), ids != PAD_ID, **kw,
                       method=lambda m, *a, **k: m.encoder(*a, **k))

  h_packed = encode(packed["input_ids"], position_ids=packed["position_ids"],
                    packing_ids=packed["packing_ids"])[0]
  h_alone = encode(alone)
  for i in range(len(docs)):
    n = offsets[i + 1] - offsets[i]
    np.testing.assert_allclose(h_packed[offsets[i]:offsets[i + 1]], h_alone[i, :n], atol=2e-5, rtol=1e-5)
  # Without the block-diagonal mask the documents would see each other.
  h_leaky = encode(packed["input_ids"], position_ids=packed["position_ids"])[0]
  assert np.abs(np.asarray(h_leaky[:offsets[1]] - h_alone[0, :offsets[1]])).max() > 1e-3

  # MLM + SBO loss sums with one masked span [s, e] per document, same tokens both ways.
  spans = [(2, 4), (3, 9), (1, 1)]  # in each document's own positions ([CLS] = 0)

  def predictions(ids, offset_of):
    rows = [[] for _ in range(len(ids))]
    for i, (s, e) in enumerate(spans):
      r, o = offset_of(i)
      rows[r] += [(o + p, o + s - 1, o + e + 1) for p in range(s, e + 1)]
    width = max(len(r) for r in rows)
    arr = np.zeros((len(ids), width, 3), np.int32)
    w = np.zeros((len(ids), width), np.float32)
    for r, items in enumerate(rows):
      arr[r, :len(items)], w[r, :len(items)] = items, 1.0
    pos = jnp.asarray(arr[..., 0])
    targets = jnp.take_along_axis(ids, pos, axis=1)
    preds = objectives.Predictions(pos, targets, jnp.asarray(w), jnp.asarray(arr[..., 1]),
                                   jnp.asarray(arr[..., 2]))
    masked = ids.at[jnp.arange(len(ids))[:, None], pos].set(jnp.where(preds.weights > 0, masking.MASK_ID,
                                                                       targets))
    return masked, preds

  def sums(ids, offset_of, **kw):
    masked, preds = predictions(ids, offset_of)
    out = model.apply({"params": params}, masked, jnp.zeros_like(ids), ids != PAD_ID, preds.positions,
                      preds.left, preds.right, **kw)
    return objectives.pretraining_sums(out, preds, 256)

  s_packed = sums(packed["input_ids"], lambda i: (0, offsets[i]), position_ids=packed["position_ids"],
                  packing_ids=packed["packing_ids"])
  s_alone = sums(alone, lambda i: (i, 0))
  assert float(s_packed["num_predictions"]) == float(s_alone["num_predictions"]) == 11
  for k in ("mlm_loss", "sbo_loss", "mlm_correct"):
    assert float(s_packed[k]) == pytest.approx(float(s_alone[k]), rel=1e-5, abs=1e-5), k


def test_masked_spans_stay_inside_their_segment():
  rows = prepare.pack_rows(random_docs(2, lengths=(4, 9, 3, 12, 6, 2, 20, 5)), L, "packed")
  ids = jnp.asarray(rows["input_ids"])
  table = np.ones(256, bool)  # every token a word start: spans may run as long as allowed
  mask = jax.jit(lambda key: masking.mask_spans(key, ids, table, vocab_size=256, rate=0.5, geometric_p=0.05))
  for seed in range(4):
    m = mask(jax.random.PRNGKey(seed))
    pack = rows["packing_ids"]
    for r in range(len(ids)):
      masked = np.nonzero(np.asarray(m.weights[r]) > 0)[0]
      left, right = np.asarray(m.left[r])[masked], np.asarray(m.right[r])[masked]
      # The span boundaries x_{s-1}, x_{e+1} (SBO's inputs) are in the token's own document.
      np.testing.assert_array_equal(pack[r, left], pack[r, masked])
      np.testing.assert_array_equal(pack[r, right], pack[r, masked])


@pytest.mark.slow
def test_prepare_packed_corpus_and_train_step(tmp_path):
  """End to end: prepare a corpus of short documents packed, read batches, take a train step."""
  text = open(sample.corpus_files()[0], "rb").read()
  paragraphs = [p for p in gzip.decompress(text).decode("utf-8").split("\n\n") if len(p) > 200][50:110]
  for i, p in enumerate(paragraphs):  # 60 short documents: padding dominates 'document' rows
    with open(tmp_path / f"doc{i:03d}.txt", "w") as f:
      f.write(p)
  stats = {}
  for mode in ("document", "packed"):
    stats[mode] = prepare.prepare_corpus(str(tmp_path / "*.txt"), sample.tokenizer_path(),
                                         str(tmp_path / mode), seq_len=64, validation_fraction=0.05,
                                         packing=mode)
  assert stats["packed"]["train_tokens"] == stats["document"]["train_tokens"]
  assert stats["packed"]["train_pad_fraction"] < stats["document"]["train_pad_fraction"] - 0.1
  assert stats["packed"]["train_rows"] < stats["document"]["train_rows"]
  ds = prepare.load_prepared(str(tmp_path / "packed"))
  batch = next(pipeline.train_iterator(ds.train, global_batch_size=8, seed=0))
  assert set(batch) == {"input_ids", "segment_ids", "position_ids", "packing_ids"}
  with pytest.raises(ValueError, match="packing='packed' but config.data.packing='document'"):
    prepare.ensure_prepared(str(tmp_path / "packed"), str(tmp_path), 64)

  c = spanlm.load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "span_bert.py:tiny"))
  c.train.batch_size, c.train.seq_len, c.data.packing = 8, 64, "packed"
  trainer = spanlm.Trainer(c, ds.vocab_size, np.ones(ds.vocab_size, bool),
                           parallel.make_mesh(c.mesh, jax.devices()[:1]))
  state, metrics = trainer.train_step(trainer.init_state(), parallel.global_batch(batch, trainer.mesh))
  assert np.isfinite(float(metrics["loss"]))
