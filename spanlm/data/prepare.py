"""Raw text -> tokenized, packed rows in a TFDS array_record dataset.

Tokenization happens once, offline, so training only does random-access reads
of fixed-shape int32 rows (`pipeline.py`). A prepared directory is
self-contained: the TFDS dataset, `spanlm_meta.json`, and a copy of the
tokenizer that produced the ids.

Row layout (single segment): `[CLS] t_1 ... t_k [SEP] [PAD]...` with
k <= seq_len - 2. A document's paragraphs are concatenated and cut into
consecutive rows; rows never cross documents and only a document's last row is
short. Nothing is dropped, however short. `segment_ids` is all zeros here and
exists so two-segment (NSP/SOP) layouts can be added without a format change.

Validation split: with C_d the number of rows in documents 1..d (files in
sorted order) and f the validation fraction, document d gives its *last*
k_d = ceil(f*C_d) - ceil(f*C_{d-1}) rows to validation and the rest to train.
So validation has ceil(f*N) >= 1 rows, spread over documents in proportion to
their size (each book of a multi-book corpus contributes its ending), it is
disjoint from train, and it is deterministic.

Packing modes (`packing`; Liu et al. 2019 §4.2 for full_sentences, Krell et
al. 2021 "Efficient sequence packing without cross-contamination" for packed):
- 'document': the layout above; the last row of every document is padded.
- 'full_sentences' (RoBERTa): each split's documents are concatenated with a
  [SEP] between them and cut into full rows `[CLS] ... [SEP]`; attention spans
  the document boundary, no padding except at the very end.
- 'packed': each document is cut into pieces of <= seq_len - 2 tokens (as in
  'document'); each piece becomes a segment `[CLS] piece [SEP]` and the short
  pieces (document tails) share rows, first-fit in order of decreasing length.
  Rows carry `position_ids` (restarting at 0 in each segment) and
  `packing_ids` (1, 2, ... per segment, 0 on padding); the model blocks
  attention between segments, so a packed row computes exactly what its
  segments would alone, without the padding.
In every mode the validation split takes the same documents' endings (the
tokens of the last k_d 'document'-mode rows), so the held-out text does not
depend on the packing mode.

Packed rows are held in memory before writing (4 bytes per token, briefly
twice), fine up to a few hundred million tokens; prepare larger corpora in
several output directories.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from fractions import Fraction
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from spanlm import paths
from spanlm.data import corpus as corpus_lib
from spanlm.data import sample
from spanlm.data.tokenizer import (CLS_ID, PAD_ID, SEP_ID, UNK_ID, Tokenizer, check_unknown_share,
                                   train_sentencepiece)

META_FILE = "spanlm_meta.json"
PACKING_MODES = ("document", "full_sentences", "packed")
MIN_SEQ_LEN = 8
_ENCODE_CHUNK = 4096  # Paragraphs per multi-threaded encode_batch call.
_PREPARE_HINT = "Create one with: python tools/prepare_corpus.py --input=GLOB --tokenizer=SP.model --out=DIR"


class _LocalInfo(tfds.core.DatasetInfo):
  """A dataset that is never in TFDS's gs://tfds-data bucket: TFDS's `initialize_from_bucket` (called
  for every new builder) made an empty /tmp/tmp*tfds folder on each call and never removed it."""

  def initialize_from_bucket(self) -> None:
    pass


class SpanlmCorpus(tfds.core.GeneratorBasedBuilder):
  """Writes already packed rows; reading goes through `tfds.builder_from_directory`."""

  VERSION = tfds.core.Version("1.0.0")
  # TFDS looks for a checksums file next to a packaged builder's code, which
  # needs the `importlib_resources` backport; nothing is downloaded, so skip it.
  code_path = None

  def __init__(self, *, rows: dict[str, dict[str, np.ndarray]], seq_len: int, **kwargs):
    self._rows = rows  # split -> feature name -> int32 [num_rows, seq_len]
    self._seq_len = seq_len
    super().__init__(**kwargs)

  def _log_download_bytes(self):  # TFDS prints "Downloading and preparing ..."; nothing is downloaded
    pass

  _log_download_done = _log_download_bytes

  def _info(self) -> tfds.core.DatasetInfo:
    row = tfds.features.Tensor(shape=(self._seq_len,), dtype=np.int32)
    names = next(iter(self._rows.values())).keys()
    return _LocalInfo(
        builder=self,
        description="spanlm pretraining rows: [CLS] tokens [SEP] [PAD]...",
        features=tfds.features.FeaturesDict({name: row for name in names}),
        disable_shuffling=True,  # Keep written order: ds[i] is row i, validation in document order.
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(rows) for split, rows in self._rows.items()}

  def _generate_examples(self, rows: dict[str, np.ndarray]):
    for i in range(len(rows["input_ids"])):
      yield i, {name: feature[i] for name, feature in rows.items()}


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  meta: dict[str, Any]
  seq_len: int
  vocab_size: int
  tokenizer_path: str
  train: Any       # Random-access TFDS data source: len(), ds[i] -> dict of np arrays.
  validation: Any


def pack_document(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Cuts one document's tokens into int32 [num_rows, seq_len] rows of [CLS] ... [SEP] [PAD]*."""
  body = seq_len - 2
  n = len(tokens)
  num_rows = -(-n // body)
  chunks = np.full(num_rows * body, PAD_ID, np.int32)
  chunks[:n] = tokens
  rows = np.full((num_rows, seq_len), PAD_ID, np.int32)
  rows[:, 0] = CLS_ID
  rows[:, 1:-1] = chunks.reshape(num_rows, body)
  lengths = np.minimum(body, n - body * np.arange(num_rows))
  rows[np.arange(num_rows), lengths + 1] = SEP_ID
  return rows


def pack_full_sentences(docs: list[np.ndarray], seq_len: int) -> np.ndarray:
  """RoBERTa FULL-SENTENCES rows: documents joined by [SEP], cut into [CLS] ... [SEP] rows."""
  stream = []
  for i, tokens in enumerate(docs):
    if i:
      stream.append(np.array([SEP_ID], np.int32))
    stream.append(np.asarray(tokens, np.int32))
  stream = np.concatenate(stream) if stream else np.zeros(0, np.int32)
  if len(stream) and stream[-1] == SEP_ID:  # never end a row's body on a separator alone
    stream = stream[:-1]
  return pack_document(stream, seq_len) if len(stream) else np.zeros((0, seq_len), np.int32)


def pack_segments(docs: list[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """'packed' rows: segments [CLS] piece [SEP] sharing rows, with position and packing ids.

  Pieces are cut as in `pack_document`; full pieces fill a row each, the rest
  are placed first-fit in order of decreasing length (stable, so deterministic).
  """
  body = seq_len - 2
  pieces = [np.asarray(t[i:i + body], np.int32) for t in docs for i in range(0, len(t), body)]
  order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i]))
  rows: list[list[int]] = []  # piece indices per row
  free: list[int] = []  # free token slots per row
  open_rows: list[int] = []  # rows that can still take a 1-token segment (3 slots)
  for i in order:
    need = len(pieces[i]) + 2
    slot = next((r for r in open_rows if free[r] >= need), None)
    if slot is None:
      rows.append([])
      free.append(seq_len)
      slot = len(rows) - 1
      open_rows.append(slot)
    rows[slot].append(i)
    free[slot] -= need
    if free[slot] < 3:
      open_rows.remove(slot)
  out = {name: np.zeros((len(rows), seq_len), np.int32)
         for name in ("input_ids", "segment_ids", "position_ids", "packing_ids")}
  for r, members in enumerate(rows):
    start = 0
    for k, i in enumerate(sorted(members), start=1):  # segments in corpus order within a row
      n = len(pieces[i]) + 2
      out["input_ids"][r, start:start + n] = np.concatenate([[CLS_ID], pieces[i], [SEP_ID]])
      out["position_ids"][r, start:start + n] = np.arange(n)
      out["packing_ids"][r, start:start + n] = k
      start += n
  return out


def pack_rows(docs: list[np.ndarray], seq_len: int, packing: str) -> dict[str, np.ndarray]:
  """A split's documents (token arrays) -> feature dict of int32 [num_rows, seq_len] rows."""
  if packing == "document":
    ids = (np.concatenate([pack_document(t, seq_len) for t in docs]) if docs
           else np.zeros((0, seq_len), np.int32))
  elif packing == "full_sentences":
    ids = pack_full_sentences(docs, seq_len)
  elif packing == "packed":
    return pack_segments(docs, seq_len)
  else:
    raise ValueError(f"packing={packing!r}; choose one of {PACKING_MODES}")
  return {"input_ids": ids, "segment_ids": np.zeros_like(ids)}


def packing_stats(rows: np.ndarray) -> dict[str, float]:
  """Padding share of a split's token slots: the compute a packing mode wastes."""
  total = rows.size
  return {"rows": len(rows), "pad_fraction": float((rows == PAD_ID).sum() / max(total, 1))}


def _num_text_tokens(rows: np.ndarray) -> int:
  return int(np.isin(rows, (PAD_ID, CLS_ID, SEP_ID), invert=True).sum())


def _tokenize_documents(docs, tokenizer: Tokenizer, num_threads: int):
  """Yields each document's int32 tokens, encoding paragraphs in large multi-threaded batches."""
  counts, texts = [], []  # Paragraphs per pending document, and their text.

  def flush():
    ids = iter(tokenizer.encode_batch(texts, num_threads=num_threads))
    for count in counts:
      yield np.fromiter((t for _ in range(count) for t in next(ids)), np.int32)
    counts.clear()
    texts.clear()

  for doc in docs:
    counts.append(len(doc.paragraphs))
    texts.extend(doc.paragraphs)
    if len(texts) >= _ENCODE_CHUNK:
      yield from flush()
  yield from flush()


def _validation_counts(rows_per_doc: list[int], fraction: float) -> list[int]:
  """k_d = ceil(f*C_d) - ceil(f*C_{d-1}), exact in rational arithmetic (see module docstring)."""
  f = Fraction(str(fraction))
  cumulative = np.cumsum([0] + rows_per_doc).tolist()
  targets = [math.ceil(f * c) for c in cumulative]
  return [b - a for a, b in zip(targets, targets[1:])]


def _file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _read_meta(path) -> dict[str, Any] | None:
  try:
    return json.loads((paths.path(path) / META_FILE).read_text())
  except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):  # a text file is not a dataset
    return None


def is_prepared(path) -> bool:
  """Whether `path` (local or gs://) holds a complete prepared dataset (the meta file is written last)."""
  meta = _read_meta(path)
  return bool(meta) and (paths.path(path) / meta.get("tfds_dir", "") / "dataset_info.json").exists()


def _cache_root():
  return os.environ.get("SPANLM_DATA_CACHE", os.path.join(tempfile.gettempdir(), "spanlm_data_cache"))


def local_copy(data_dir) -> str:
  """A local directory holding the prepared dataset `data_dir`: itself if local, else a per-host
  cache copy (array_record reads local files only), fetched once and reused."""
  if not paths.is_remote(data_dir):
    return str(data_dir)
  name = os.path.basename(str(data_dir).rstrip("/")) + "-" + hashlib.sha256(str(data_dir).encode()).hexdigest()[:8]
  local = os.path.join(_cache_root(), name)
  if not is_prepared(local):
    logging.info("copying prepared dataset %s to the local cache %s", data_dir, local)
    shutil.rmtree(local, ignore_errors=True)
    tmp = local + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
      paths.copy_tree(paths.path(data_dir), paths.path(tmp), last=META_FILE)
    except Exception as e:  # noqa: BLE001
      raise paths.access_error(data_dir, e) from e
    os.replace(tmp, local) if not os.path.exists(local) else shutil.rmtree(tmp)
  return local


def local_file(p) -> str:
  """A local path for the file `p` (a gs:// file is fetched into the cache once)."""
  if not paths.is_remote(p):
    return str(p)
  local = os.path.join(_cache_root(), "files", hashlib.sha256(str(p).encode()).hexdigest()[:12],
                       os.path.basename(str(p)))
  if not os.path.exists(local):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
      paths.path(p).copy(paths.path(local + ".tmp"), overwrite=True)
    except Exception as e:  # noqa: BLE001
      raise paths.access_error(p, e) from e
    os.replace(local + ".tmp", local)
  return local


def prepare_corpus(files_or_glob, tokenizer_path: str, out_dir: str, seq_len: int,
                   validation_fraction: float = 0.01, num_threads: int = 0,
                   strict: bool = True, packing: str = "document") -> dict[str, Any]:
  """Tokenizes and packs a raw corpus into a TFDS array_record dataset at `out_dir`.

  Args:
    files_or_glob: glob, comma-separated globs, or list of .txt/.txt.gz files.
    tokenizer_path: SentencePiece `.model` with spanlm's reserved ids.
    out_dir: empty/new directory, or a previous spanlm dataset prepared with
      the same parameters (which is rebuilt).
    seq_len: row length including [CLS] and [SEP].
    validation_fraction: share of rows held out, in (0, 1); see module docstring.
    num_threads: tokenizer threads, <= 0 for all cores.
    strict: raise on bad input files instead of skipping them.
    packing: 'document' | 'full_sentences' | 'packed' (module docstring).

  Returns:
    Stats: rows/tokens per split, skipped files, tokens_per_sec, ...
  """
  if seq_len < MIN_SEQ_LEN:
    raise ValueError(f"seq_len={seq_len} is too short; need >= {MIN_SEQ_LEN} ([CLS] + tokens + [SEP]).")
  if not 0 < validation_fraction < 1:
    raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1).")
  if packing not in PACKING_MODES:
    raise ValueError(f"packing={packing!r}; choose one of {PACKING_MODES}.")
  files = corpus_lib.resolve_files(files_or_glob)
  tokenizer = Tokenizer.load(tokenizer_path)
  params = {
      "seq_len": seq_len,
      "validation_fraction": validation_fraction,
      "tokenizer_sha256": _file_sha256(tokenizer_path),
      "source_files": [os.path.abspath(f) for f in files],
      **({"packing": packing} if packing != "document" else {}),  # old datasets stay valid
  }
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    old = _read_meta(out_dir)
    if not old or old.get("params") != params:
      what = "a spanlm dataset prepared with different parameters" if old else "not a spanlm dataset"
      raise FileExistsError(
          f"Refusing to overwrite {out_dir}: it is not empty and is {what}. "
          f"Delete it or choose another output directory.")
    logging.info("Rebuilding %s (same parameters as before).", out_dir)
    os.remove(os.path.join(out_dir, META_FILE))
    shutil.rmtree(os.path.join(out_dir, old["tfds_dir"]), ignore_errors=True)

  start = time.perf_counter()
  stats = corpus_lib.CorpusStats()
  docs = corpus_lib.read_documents(files, strict=strict, stats=stats)
  doc_tokens = [t for t in _tokenize_documents(docs, tokenizer, num_threads) if len(t)]
  num_tokens = sum(len(t) for t in doc_tokens)
  unk_fraction = check_unknown_share(sum(int(np.count_nonzero(t == UNK_ID)) for t in doc_tokens), num_tokens,
                                     tokenizer_path)
  # Held-out share per document in 'document'-mode rows, then cut at the token level so every
  # packing mode holds out the same text.
  body = seq_len - 2
  counts = _validation_counts([-(-len(t) // body) for t in doc_tokens], validation_fraction)
  parts = {"train": [], "validation": []}
  for tokens, k in zip(doc_tokens, counts):
    cut = min(len(tokens), body * (-(-len(tokens) // body) - k))
    parts["train"].append(tokens[:cut])
    parts["validation"].append(tokens[cut:])
  splits = {name: pack_rows([t for t in docs if len(t)], seq_len, packing) for name, docs in parts.items()}
  num_rows = sum(len(r["input_ids"]) for r in splits.values())
  if not len(splits["train"]["input_ids"]):
    raise ValueError(
        f"The corpus packs into only {num_rows} row(s) of seq_len={seq_len}, too few to hold out "
        f"validation_fraction={validation_fraction} and keep any training rows; add text or lower seq_len.")
  tokenize_seconds = time.perf_counter() - start
  logging.info("Tokenized and packed %d tokens into %d rows in %.1fs (%.0f tokens/s).",
               num_tokens, num_rows, tokenize_seconds, num_tokens / tokenize_seconds)

  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory() as download_dir:
    builder = SpanlmCorpus(rows=splits, seq_len=seq_len, data_dir=out_dir, file_format="array_record")
    builder.download_and_prepare(download_dir=download_dir)
  tokenizer_copy = os.path.join(out_dir, os.path.basename(tokenizer_path))
  if not os.path.exists(tokenizer_copy) or not os.path.samefile(tokenizer_path, tokenizer_copy):
    shutil.copy(tokenizer_path, tokenizer_copy)
  total_seconds = time.perf_counter() - start

  stats_out = {
      "seq_len": seq_len,
      "vocab_size": tokenizer.vocab_size,
      "tokenizer": os.path.basename(tokenizer_path),
      "files_read": stats.files_read,
      "files_skipped": stats.files_skipped,
      "paragraphs": stats.paragraphs,
      "characters": stats.characters,
      "tokens": num_tokens,
      "unk_fraction": round(unk_fraction, 5),
      "packing": packing,
      **{f"{name}_rows": len(rows["input_ids"]) for name, rows in splits.items()},
      **{f"{name}_tokens": _num_text_tokens(rows["input_ids"]) for name, rows in splits.items()},
      **{f"{name}_pad_fraction": round(packing_stats(rows["input_ids"])["pad_fraction"], 5)
         for name, rows in splits.items()},
      "tokenize_seconds": round(tokenize_seconds, 3),
      "tokens_per_sec": round(num_tokens / tokenize_seconds),
      "total_seconds": round(total_seconds, 3),
      "overall_tokens_per_sec": round(num_tokens / total_seconds),
  }
  meta = {**stats_out, "params": params, "tfds_dir": os.path.relpath(builder.data_dir, out_dir)}
  with open(os.path.join(out_dir, META_FILE), "w") as f:  # Written last: marks the dataset complete.
    json.dump(meta, f, indent=2)
  logging.info("Wrote %s in %.1fs (%.0f tokens/s overall).", out_dir, total_seconds, num_tokens / total_seconds)
  return {**stats_out, "out_dir": out_dir}


def load_prepared(data_dir: str) -> PreparedDataset:
  """Opens a prepared dataset's train/validation splits as random-access data sources."""
  meta = _read_meta(data_dir)
  if meta is None:
    raise FileNotFoundError(
        f"{data_dir!r} is not a prepared spanlm dataset: {os.path.join(data_dir, META_FILE)} is missing "
        f"or unreadable. {_PREPARE_HINT}")
  tfds_dir = os.path.join(data_dir, meta["tfds_dir"])
  tokenizer_path = os.path.join(data_dir, meta["tokenizer"])
  for path in (os.path.join(tfds_dir, "dataset_info.json"), tokenizer_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Prepared dataset {data_dir!r} is incomplete: {path} is missing. {_PREPARE_HINT}")
  builder = tfds.builder_from_directory(tfds_dir)
  return PreparedDataset(
      meta=meta, seq_len=meta["seq_len"], vocab_size=meta["vocab_size"], tokenizer_path=tokenizer_path,
      train=builder.as_data_source("train"), validation=builder.as_data_source("validation"))


def _fingerprint(*parts) -> str:
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def _file_key(path: str) -> list:
  if paths.is_remote(path):  # a gs:// text file: its URL, size and modification time
    st = paths.path(path).stat()
    return [path, st.length, st.mtime]
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def ensure_prepared(corpus: str, workdir, seq_len: int, tokenizer: str = "",
                    vocab_size: int = 8000, validation_fraction: float = 0.01,
                    packing: str = "document", strict: bool = True) -> str:
  """Returns a prepared dataset directory for `corpus`, preparing it if needed.

  `corpus` is '' (the bundled sample, with its shipped tokenizer unless
  `tokenizer` is given), a prepared dataset directory (used as is), or raw
  text: a file, a folder of .txt/.txt.gz files, or a glob, prepared into
  `workdir/data/<hash of files, sizes, mtimes, tokenizer, seq_len, packing, strict>` so rerunning
  the same command reuses it. With raw text and no `tokenizer`, a `vocab_size`
  SentencePiece model is trained on it. `strict=False` skips bad files.

  With several JAX processes, process 0 prepares and the others wait at a
  barrier; `workdir` must be on a filesystem all processes share, or gs://
  (then process 0 prepares locally and uploads; `local_copy` fetches it per host).
  """
  from spanlm import resilience
  if corpus and is_prepared(corpus):
    meta = _read_meta(corpus)
    if meta.get("packing", "document") != packing:
      raise ValueError(
          f"Prepared dataset {corpus!r} has packing={meta.get('packing', 'document')!r} but "
          f"config.data.packing={packing!r}; re-prepare it with tools/prepare_corpus.py "
          f"--packing={packing}, or pass the raw text glob instead.")
    if meta["seq_len"] != seq_len:
      raise ValueError(
          f"Prepared dataset {corpus!r} has seq_len={meta['seq_len']} but seq_len={seq_len} was "
          f"requested. Re-prepare it with tools/prepare_corpus.py --seq_len={seq_len}, or pass the raw "
          f"text glob instead.")
    if tokenizer and _file_sha256(local_file(tokenizer)) != meta["params"]["tokenizer_sha256"]:
      raise ValueError(
          f"Tokenizer {tokenizer!r} differs from the one {corpus!r} was prepared with "
          f"({meta['tokenizer']}); leave the tokenizer unset to use the dataset's own.")
    return corpus
  files = corpus_lib.resolve_files(corpus) if corpus else sample.corpus_files()
  tokenizer = local_file(tokenizer) if tokenizer else ("" if corpus else sample.tokenizer_path())
  if tokenizer and not os.path.isfile(tokenizer):
    raise FileNotFoundError(
        f"Tokenizer {tokenizer!r} does not exist. Leave it unset to train one on the corpus, or create "
        f"one with tools/train_tokenizer.py.")
  tokenizer_key = _file_key(tokenizer) if tokenizer else ["train", vocab_size]
  # skip_bad_files is part of the key: a strict run must not reuse data that silently left bad files out.
  key = _fingerprint([_file_key(f) for f in files], tokenizer_key, seq_len, validation_fraction,
                     *([packing] if packing != "document" else []), *([] if strict else ["skip_bad_files"]))
  out = paths.path(workdir) / "data" / key
  if is_prepared(out):
    logging.info("Reusing prepared dataset %s", out)
    return str(out)
  if jax.process_index() == 0:
    remote = paths.is_remote(out)
    local_out = os.path.join(_cache_root(), f"{key}-prepare") if remote else str(out)
    shutil.rmtree(local_out, ignore_errors=True)  # Ours by construction: a partial earlier attempt.
    os.makedirs(os.path.dirname(local_out), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(local_out)) as tmp:
      if not tokenizer:
        tokenizer = train_sentencepiece(files, os.path.join(tmp, f"sp{vocab_size}"), vocab_size, strict=strict)
      prepare_corpus(files, tokenizer, local_out, seq_len, validation_fraction, packing=packing, strict=strict)
    if remote:
      if out.exists():
        out.rmtree()
      paths.copy_tree(paths.path(local_out), out, last=META_FILE)
      shutil.rmtree(local_out, ignore_errors=True)
  # Preparing a large corpus takes long: the others wait up to a day, then name who is missing.
  resilience.barrier(f"prepare_{key}", timeout_s=24 * 3600)
  if not is_prepared(out):
    raise FileNotFoundError(f"{out} was not prepared by process 0; is the workdir on a filesystem all "
                            f"processes share (or gs://)?")
  return str(out)
