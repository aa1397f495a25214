"""Data layer: tokenizer, corpus reading, packing into TFDS array_record, grain pipeline."""
import gzip
import json
import math
import os
import sys
import tempfile

import numpy as np
import pytest
import sentencepiece as spm

from spanlm.data import (CLS_ID, NUM_RESERVED, PAD_ID, SEP_ID, SPECIAL_TOKENS, CorpusError, CorpusStats,
                         Tokenizer, ensure_prepared, eval_batches, is_prepared, load_prepared, prepare_corpus,
                         read_documents, resolve_files, sample, train_iterator, train_sentencepiece)
from spanlm.data.corpus import strip_gutenberg

SEQ_LEN = 32


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.load(sample.tokenizer_path())


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
  """Four documents cut from the bundled books: three of 40 paragraphs (one gzipped), one tiny."""
  root = tmp_path_factory.mktemp("corpus")
  books = sample.corpus_files()[:3]
  docs = {}
  for i, book in enumerate(books):
    paragraphs = next(read_documents([book])).paragraphs[:40]
    name = root / (f"doc{i}.txt.gz" if i == 1 else f"doc{i}.txt")
    text = "\n\n".join(paragraphs) + "\n"
    name.write_bytes(gzip.compress(text.encode()) if i == 1 else text.encode())
    docs[str(name)] = paragraphs
  tiny = root / "doc3.txt"
  tiny.write_text("The end.\n")
  docs[str(tiny)] = ["The end."]
  return root, docs


@pytest.fixture(scope="module")
def prepared(small_corpus, tmp_path_factory):
  root, _ = small_corpus
  out = tmp_path_factory.mktemp("prepared")
  stats = prepare_corpus(str(root / "doc*"), sample.tokenizer_path(), str(out), SEQ_LEN,
                         validation_fraction=0.1)
  return str(out), stats


def write(path, data: bytes):
  path.write_bytes(data)
  return str(path)


def text_tokens(row):
  return [int(t) for t in row if t not in (PAD_ID, CLS_ID, SEP_ID)]


def rows_of(source):
  return [source[i]["input_ids"] for i in range(len(source))]


def synthetic_source(n, seq_len=4):
  """Row i is all i, so batches reveal which rows they hold."""
  return [{"input_ids": np.full(seq_len, i, np.int32), "segment_ids": np.zeros(seq_len, np.int32)}
          for i in range(n)]


def ids(batch):
  return batch["input_ids"][:, 0].tolist()


# --- tokenizer ---------------------------------------------------------------


def test_reserved_ids_and_word_start_table(tok):
  assert tok.vocab_size == 8000
  assert tuple(tok.id_to_piece(i) for i in range(NUM_RESERVED)) == SPECIAL_TOKENS
  table = tok.word_start_table()
  assert table.dtype == bool and table.shape == (tok.vocab_size,)
  assert not table[:NUM_RESERVED].any()
  expected = [tok.id_to_piece(i).startswith("\u2581") for i in range(NUM_RESERVED, tok.vocab_size)]
  assert table[NUM_RESERVED:].tolist() == expected
  assert 0.5 < table.mean() < 1  # Most pieces of an English unigram model start words.


def test_masking_uses_the_tokenizers_reserved_ids():
  # masking.py keeps its own copy (so the jitted side never imports TFDS); they must agree.
  from spanlm.objectives import masking
  from spanlm.data import tokenizer
  for name in ("PAD_ID", "UNK_ID", "CLS_ID", "SEP_ID", "MASK_ID", "NUM_RESERVED"):
    assert getattr(masking, name) == getattr(tokenizer, name), name


def test_encode_decode_round_trip(tok):
  texts = ["The quick brown fox jumps over the lazy dog.", "Call me Ishmael, said he."]
  encoded = tok.encode_batch(texts, num_threads=2)
  assert encoded == [tok.encode(t) for t in texts]
  for text, ids_ in zip(texts, encoded):
    assert min(ids_) >= NUM_RESERVED
    assert tok.decode([PAD_ID] + ids_ + [PAD_ID, PAD_ID]) == text.lower()  # Uncased model.
  assert tok.word_start_table()[encoded[0]].sum() == 9  # One word start per word.


def test_train_sentencepiece_reserves_ids(small_corpus, tmp_path):
  root, _ = small_corpus
  path = train_sentencepiece(str(root / "doc*"), str(tmp_path / "sp"), vocab_size=300)
  trained = Tokenizer.load(path)
  assert trained.vocab_size == 300
  assert tuple(trained.id_to_piece(i) for i in range(NUM_RESERVED)) == SPECIAL_TOKENS


def test_tokenizer_errors(tmp_path, small_corpus):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="(?s)nope.model.*tools/train_tokenizer.py"):
    Tokenizer.load(missing)
  root, _ = small_corpus  # A default SentencePiece model: <unk>=0, <s>=1, </s>=2.
  spm.SentencePieceTrainer.train(input=str(root / "doc0.txt"), model_prefix=str(tmp_path / "plain"),
                                 vocab_size=100, minloglevel=2)
  with pytest.raises(ValueError, match=r"plain.model: ids 0..4 are .*<unk>.*expected"):
    Tokenizer.load(str(tmp_path / "plain.model"))


def test_tokenizer_trains_on_a_line_longer_than_sentencepiece_accepts(tmp_path):
  """A 300 kB paragraph without a newline (and a 100 kB one without a space) is split, not dropped."""
  rng = np.random.default_rng(0)
  words = np.array("the of and a to in is was that he it for with as his on be at by".split())
  (tmp_path / "one_line.txt").write_text(" ".join(rng.choice(words, 100_000))[:300_000] + " " + "x" * 100_000)
  path = train_sentencepiece(str(tmp_path / "one_line.txt"), str(tmp_path / "sp"), vocab_size=40)
  assert Tokenizer.load(path).vocab_size == 40


def test_tokenizer_lowers_the_vocabulary_to_what_the_corpus_supports(small_corpus, tmp_path):
  root, _ = small_corpus
  path = train_sentencepiece(str(root / "doc3.txt"), str(tmp_path / "sp"), vocab_size=8000)
  size = Tokenizer.load(path).vocab_size
  assert NUM_RESERVED < size < 100  # 'The end.' supports a handful of pieces


# --- corpus ------------------------------------------------------------------


def test_strip_gutenberg_and_paragraphs(tmp_path):
  text = ("\ufeffThe Project Gutenberg EBook of X\r\nlicence blah\r\n"
          "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\nChapter 1\r\n\r\n"
          "It was a dark\r\nand stormy   night.\r\n  \r\nThe end.\r\n\r\n"
          "End of the Project Gutenberg EBook of X\r\n\r\n"
          "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nfull licence\r\n")
  path = write(tmp_path / "book.txt.gz", gzip.compress(text.encode("utf-8")))
  stats = CorpusStats()
  (doc,) = read_documents([path], stats=stats)
  assert doc.path == path
  assert doc.paragraphs == ["Chapter 1", "It was a dark and stormy night.", "The end."]
  assert (stats.files_read, stats.paragraphs, stats.characters) == (1, 3, 9 + 31 + 8)
  assert strip_gutenberg("no markers\n\nhere") == "no markers\n\nhere"


def test_bundled_sample():
  files = sample.corpus_files()
  assert len(files) == 10 and all(f.endswith(".txt.gz") for f in files)
  assert os.path.isfile(os.path.join(os.path.dirname(files[0]), "ATTRIBUTION.md"))
  stats = CorpusStats()
  for doc in read_documents(files, stats=stats):
    assert not any("project gutenberg" in p.lower() for p in doc.paragraphs), doc.path
  assert stats.files_read == 10 and 4_000_000 < stats.characters < 6_000_000


@pytest.mark.parametrize("data, problem", [
    (b"", "file is empty"),
    (b"  \n\n \n", "file is empty"),
    (b"PK\x03\x04\x00\x00\x08\x00binary", "NUL bytes"),
    ("caf\xe9 cr\xe8me".encode("latin-1"), r"not valid UTF-8 \(bad byte 0xe9 at offset 3\)"),
    (bytes(range(1, 32)) * 10, "control characters"),
    (b"*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***",
     "no text left"),
])
def test_bad_files_raise_naming_file_and_fix(tmp_path, data, problem):
  path = write(tmp_path / "bad.txt", data)
  with pytest.raises(CorpusError, match=problem) as e:
    list(read_documents([path]))
  assert path in str(e.value) and "--config.data.skip_bad_files=True" in str(e.value)


def test_corrupt_gzip(tmp_path):
  path = write(tmp_path / "bad.txt.gz", b"this is not gzip")
  with pytest.raises(CorpusError, match="bad.txt.gz: not a valid gzip file"):
    list(read_documents([path]))


def test_skip_mode_counts_skips(tmp_path):
  good = write(tmp_path / "a_good.txt", b"Hello there.\n\nGeneral Kenobi.\n")
  bad = [write(tmp_path / "b_empty.txt", b""), write(tmp_path / "c_binary.bin", b"\x00\x01\x02"),
         write(tmp_path / "d_latin1.txt", "\xe9t\xe9".encode("latin-1"))]
  stats = CorpusStats()
  docs = list(read_documents([good] + bad, strict=False, stats=stats))
  assert [d.path for d in docs] == [good]
  assert stats.files_read == 1 and sorted(stats.files_skipped) == bad
  assert "empty" in stats.files_skipped[bad[0]] and "UTF-8" in stats.files_skipped[bad[2]]
  with pytest.raises(CorpusError, match="No usable text in 3 corpus file"):
    list(read_documents(bad, strict=False))


def test_resolve_files(tmp_path):
  a, b = write(tmp_path / "b.txt", b"x"), write(tmp_path / "a.txt.gz", b"x")
  assert resolve_files(str(tmp_path / "*")) == [b, a]
  assert resolve_files(f"{a}, {b}") == resolve_files([b, a]) == [b, a]
  with pytest.raises(FileNotFoundError, match=r"No files match '.*/nothing\*\.txt'"):
    resolve_files(f"{a},{tmp_path}/nothing*.txt")
  # A folder means its .txt/.txt.gz files; a single file is itself.
  write(tmp_path / "notes.md", b"x")
  assert resolve_files(str(tmp_path)) == [b, a] and resolve_files(a) == [a]
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no .txt or .txt.gz files"):
    resolve_files(str(tmp_path / "empty"))


# --- prepare -----------------------------------------------------------------


def test_rows_are_packed_and_lossless(prepared, small_corpus, tok):
  """Reassembles every document from train + validation rows read back through TFDS."""
  out, stats = prepared
  _, docs = small_corpus
  ds = load_prepared(out)
  assert "tensorflow" not in sys.modules
  train, val = rows_of(ds.train), rows_of(ds.validation)
  for row in train + val:
    assert row.dtype == np.int32 and row.shape == (SEQ_LEN,)
    assert row[0] == CLS_ID and (row == SEP_ID).sum() == 1 and (row == CLS_ID).sum() == 1
    sep = int(np.argmax(row == SEP_ID))
    assert (row[sep + 1:] == PAD_ID).all() and (row[:sep] != PAD_ID).all()
  assert (ds.train[0]["segment_ids"] == 0).all()

  # Each document is its train rows then its validation rows, in file order.
  ti = vi = 0
  for path in sorted(docs):
    expected = [t for ids_ in tok.encode_batch(docs[path]) for t in ids_]
    got, doc_rows = [], []
    while ti < len(train) and len(got) < len(expected) and \
        text_tokens(train[ti]) == expected[len(got):len(got) + len(text_tokens(train[ti]))]:
      got += text_tokens(train[ti])
      doc_rows.append(train[ti])
      ti += 1
    while vi < len(val) and len(got) < len(expected):
      got += text_tokens(val[vi])
      doc_rows.append(val[vi])
      vi += 1
    assert got == expected, path  # Rows never cross documents, nothing is lost or duplicated.
    assert all(len(text_tokens(r)) == SEQ_LEN - 2 for r in doc_rows[:-1])  # Only the last is short.
  assert (ti, vi) == (len(train), len(val))

  total = len(train) + len(val)
  assert len(val) == math.ceil(0.1 * total) and len(train) > 0
  assert stats["tokens"] == stats["train_tokens"] + stats["validation_tokens"] == \
      sum(len(text_tokens(r)) for r in train + val)
  assert ds.seq_len == SEQ_LEN and ds.vocab_size == 8000 and ds.meta["train_rows"] == len(train)
  assert os.path.dirname(ds.tokenizer_path) == out and Tokenizer.load(ds.tokenizer_path).vocab_size == 8000
  assert stats["tokens_per_sec"] > 0 and stats["files_read"] == 4


def test_single_document_has_validation_and_leaves_no_temporary_folders(tmp_path, monkeypatch):
  path = write(tmp_path / "one.txt", ("Just one short book about nothing at all. " * 30).encode())
  temp = tmp_path / "system_tmp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))  # TFDS left an empty tmp*tfds folder per run
  stats = prepare_corpus(path, sample.tokenizer_path(), str(tmp_path / "out"), SEQ_LEN)
  assert stats["validation_rows"] == 1 and stats["train_rows"] >= 1
  assert list(temp.iterdir()) == []


def test_prepare_skip_mode_and_overwrite_rules(prepared, small_corpus, tmp_path):
  root, _ = small_corpus
  write(tmp_path / "empty.txt", b"")
  glob = f"{root}/doc0.txt,{tmp_path}/empty.txt"
  with pytest.raises(CorpusError, match="empty.txt: file is empty"):
    prepare_corpus(glob, sample.tokenizer_path(), str(tmp_path / "a"), SEQ_LEN)
  stats = prepare_corpus(glob, sample.tokenizer_path(), str(tmp_path / "a"), SEQ_LEN, strict=False)
  assert list(stats["files_skipped"]) == [str(tmp_path / "empty.txt")] and stats["files_read"] == 1
  # Same parameters: rebuilt in place. Different ones, or a foreign directory: refused.
  prepare_corpus(glob, sample.tokenizer_path(), str(tmp_path / "a"), SEQ_LEN, strict=False)
  with pytest.raises(FileExistsError, match="Refusing to overwrite .*different parameters"):
    prepare_corpus(glob, sample.tokenizer_path(), str(tmp_path / "a"), 64, strict=False)
  with pytest.raises(FileExistsError, match="not a spanlm dataset"):
    prepare_corpus(glob, sample.tokenizer_path(), str(root), SEQ_LEN)
  with pytest.raises(ValueError, match="seq_len=4 is too short"):
    prepare_corpus(glob, sample.tokenizer_path(), str(tmp_path / "b"), 4)


def test_load_and_ensure_prepared_errors(prepared, small_corpus, tmp_path):
  out, _ = prepared
  root, _ = small_corpus
  assert is_prepared(out) and not is_prepared(str(root))
  with pytest.raises(FileNotFoundError, match="spanlm_meta.json is missing.*tools/prepare_corpus.py"):
    load_prepared(str(root))
  assert ensure_prepared(out, str(tmp_path), SEQ_LEN) == out
  with pytest.raises(ValueError, match="has seq_len=32 but seq_len=128 was requested.*Re-prepare"):
    ensure_prepared(out, str(tmp_path), 128)
  with pytest.raises(FileNotFoundError, match="missing.model"):
    ensure_prepared(str(root / "doc*"), str(tmp_path), SEQ_LEN, tokenizer=str(tmp_path / "missing.model"))
  with pytest.raises(FileNotFoundError, match="holds no .txt or .txt.gz files"):
    ensure_prepared(str(tmp_path), str(tmp_path), SEQ_LEN)


def test_ensure_prepared_trains_tokenizer_and_caches(small_corpus, tmp_path):
  root, _ = small_corpus
  out = ensure_prepared(str(root / "doc*"), str(tmp_path), SEQ_LEN, vocab_size=300)
  assert os.path.dirname(out) == str(tmp_path / "data") and is_prepared(out)
  ds = load_prepared(out)
  assert ds.vocab_size == 300 and len(ds.train) > 0 and len(ds.validation) > 0
  mtime = os.path.getmtime(os.path.join(out, "spanlm_meta.json"))
  assert ensure_prepared(str(root / "doc*"), str(tmp_path), SEQ_LEN, vocab_size=300) == out
  assert os.path.getmtime(os.path.join(out, "spanlm_meta.json")) == mtime  # Reused, not redone.
  assert ensure_prepared(str(root / "doc*"), str(tmp_path), 64, vocab_size=300) != out


def test_skip_bad_files_is_part_of_the_cache_key(small_corpus, tmp_path):
  root, _ = small_corpus
  write(tmp_path / "empty.txt", b"")
  corpus = f"{root}/doc0.txt,{tmp_path}/empty.txt"
  skipped = ensure_prepared(corpus, str(tmp_path), SEQ_LEN, tokenizer=sample.tokenizer_path(), strict=False)
  # A strict run must not reuse rows that silently left the bad file out: it reads it and refuses.
  with pytest.raises(CorpusError, match="empty.txt: file is empty"):
    ensure_prepared(corpus, str(tmp_path), SEQ_LEN, tokenizer=sample.tokenizer_path())
  clean = f"{root}/doc0.txt"
  strict = ensure_prepared(clean, str(tmp_path), SEQ_LEN, tokenizer=sample.tokenizer_path())
  assert ensure_prepared(clean, str(tmp_path), SEQ_LEN, tokenizer=sample.tokenizer_path(), strict=False) not in (
      strict, skipped)


# --- pipeline ----------------------------------------------------------------


def take(it, n):
  return [next(it) for _ in range(n)]


def test_iterator_order_is_seeded_and_epochs_reshuffle():
  source = synthetic_source(40)
  a = [ids(b) for b in take(train_iterator(source, global_batch_size=8, seed=1), 10)]
  b = [ids(b) for b in take(train_iterator(source, global_batch_size=8, seed=1), 10)]
  c = [ids(b) for b in take(train_iterator(source, global_batch_size=8, seed=2), 10)]
  assert a == b and a != c
  epoch0, epoch1 = sum(a[:5], []), sum(a[5:], [])
  assert sorted(epoch0) == sorted(epoch1) == list(range(40))
  assert epoch0 != epoch1
  plain = take(train_iterator(source, global_batch_size=8, seed=1, shuffle=False), 6)
  assert sum(map(ids, plain), []) == list(range(40)) + list(range(8))


def test_process_rows_assemble_the_one_process_batch():
  # Whatever rows each process loads (parallel.batch_rows), they are rows of the same global
  # batch: process 0's rows {0,1,4,5} and process 1's {2,3,6,7} interleave back into it.
  source = synthetic_source(40)
  whole = take(train_iterator(source, global_batch_size=8, seed=3), 7)
  parts = [take(train_iterator(source, global_batch_size=8, seed=3, rows=r), 7) for r in ([0, 1, 4, 5], [2, 3, 6, 7])]
  for step, batch in enumerate(whole):
    merged = np.empty_like(batch["input_ids"])
    merged[[0, 1, 4, 5]], merged[[2, 3, 6, 7]] = parts[0][step]["input_ids"], parts[1][step]["input_ids"]
    np.testing.assert_array_equal(merged, batch["input_ids"])
  replica = take(train_iterator(source, global_batch_size=8, seed=3, rows=[2, 3, 6, 7]), 7)
  assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(replica, parts[1]))


def test_iterator_state_round_trips(prepared):
  ds = load_prepared(prepared[0])
  it = train_iterator(ds.train, global_batch_size=4, seed=0)
  first = take(it, 3)
  assert first[0]["input_ids"].shape == (4, SEQ_LEN) and first[0]["input_ids"].dtype == np.int32
  assert set(first[0]) == {"input_ids", "segment_ids"}
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 5)
  resumed = train_iterator(ds.train, global_batch_size=4, seed=0)
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 5)):
    np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


def test_iterator_errors():
  with pytest.raises(ValueError, match="rows must be ascending indices into a global batch of 6"):
    train_iterator(synthetic_source(40), global_batch_size=6, seed=0, rows=[4, 6])
  with pytest.raises(ValueError, match="only 5 rows, fewer than one batch of 8"):
    train_iterator(synthetic_source(5), global_batch_size=8, seed=0)


def test_eval_batches_pad_and_cover(prepared):
  source = synthetic_source(10)
  batches = eval_batches(source, batch_size=4)
  assert len(batches) == 3 and all(b["input_ids"].shape == (4, 4) for b in batches)
  assert sum(map(ids, batches), [])[:10] == list(range(10))
  assert (batches[-1]["input_ids"][2:] == PAD_ID).all() and (batches[-1]["segment_ids"][2:] == 0).all()
  assert len(eval_batches(source, batch_size=4, max_batches=2)) == 2
  val = load_prepared(prepared[0]).validation
  batches = eval_batches(val, batch_size=3)
  rows = np.concatenate([b["input_ids"] for b in batches])
  np.testing.assert_array_equal(rows[:len(val)], np.stack(rows_of(val)))
  assert (rows[len(val):] == PAD_ID).all()
