"""SentencePiece tokenizer with BERT's reserved ids pinned to 0..4.

Models see ids, never strings, so the special tokens have fixed ids that the
masking and model code use as constants: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3
[MASK]=4. There is no BOS/EOS; [CLS]/[SEP] are added by `prepare.py`.

Text is normalized with SentencePiece's `nmt_nfkc_cf` rule (NFKC + Unicode
case folding), i.e. an *uncased* model like BERT-base-uncased: with the small
vocabularies (~8k) and corpora this project targets, folding case spends the
vocabulary on words instead of on capitalised duplicates. `decode` therefore
returns lower-cased text.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence

import numpy as np
import sentencepiece as spm
from absl import logging

from spanlm.data import corpus

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
NUM_RESERVED = 5
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORD_START = "\u2581"  # '▁', SentencePiece's marker for a preceding space.
# SentencePiece drops "sentences" longer than max_sentence_length *bytes* (and fails with
# `[!sentences_.empty()]` when nothing is left): paragraphs are cut into pieces of at most this
# many characters (<= 4 UTF-8 bytes each), at a space where there is one.
MAX_PIECE_CHARS = 1 << 14
MAX_UNKNOWN_SHARE = 0.01  # above this share of [UNK] tokens, preparation warns
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def split_long(paragraph: str, limit: int = MAX_PIECE_CHARS) -> Iterator[str]:
  """`paragraph` in pieces of at most `limit` characters, cut at the last space when there is one."""
  while len(paragraph) > limit:
    cut = paragraph.rfind(" ", limit // 2, limit)
    cut = cut if cut > 0 else limit
    yield paragraph[:cut]
    paragraph = paragraph[cut:].lstrip(" ")
  if paragraph:
    yield paragraph


def _training_text(files: Sequence[str], strict: bool, log_every: int = 100_000) -> Iterator[str]:
  start, paragraphs, chars = time.perf_counter(), 0, 0
  for paragraph in corpus.iter_paragraphs(files, strict=strict):
    for piece in split_long(paragraph):
      paragraphs += 1
      chars += len(piece)
      if paragraphs % log_every == 0:
        logging.info("tokenizer: read %d paragraphs (%.1f M characters) in %.0fs", paragraphs, chars / 1e6,
                     time.perf_counter() - start)
      yield piece
  logging.info("tokenizer: read %d paragraphs (%.1f M characters) from %d file(s); fitting the pieces ...",
               paragraphs, chars / 1e6, len(files))


def train_sentencepiece(input_files: str | Sequence[str], model_prefix: str, vocab_size: int,
                        model_type: str = "unigram", input_sentence_size: int = 2_000_000,
                        num_threads: int | None = None, strict: bool = True) -> str:
  """Trains a SentencePiece model on a text corpus; returns the `.model` path.

  Input goes through `corpus.read_documents` (one paragraph per sentence, over-long
  ones split by `split_long`), so `.txt.gz` works and Gutenberg boilerplate does
  not leak into the vocabulary. Up to `input_sentence_size` paragraphs are
  sampled for training. A corpus too small for `vocab_size` pieces gets the
  largest vocabulary it supports, with a warning. `strict=False` skips bad files.
  """
  files = corpus.resolve_files(input_files)
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  start = time.perf_counter()
  logging.info("tokenizer: training a %s SentencePiece model with %d pieces on %d file(s)", model_type,
               vocab_size, len(files))
  for _ in range(3):
    try:
      _train(files, model_prefix, vocab_size, model_type, input_sentence_size, num_threads, strict)
      break
    except RuntimeError as e:
      too_high = _TOO_HIGH.search(str(e))
      if not too_high:
        raise ValueError(f"SentencePiece could not train on {len(files)} file(s): {e}") from None
      supported = int(too_high.group(2))
      if supported <= NUM_RESERVED + 1:
        raise ValueError(f"the corpus is too small for a tokenizer: it supports only {supported} pieces; "
                         f"add text") from None
      logging.warning("tokenizer: the corpus supports at most %d pieces, not %d; training with "
                      "vocab_size=%d (set config.data.vocab_size / --vocab_size=%d to silence this)",
                      supported, vocab_size, supported, supported)
      vocab_size = supported
  else:
    raise ValueError(f"SentencePiece kept refusing vocabulary sizes; pass --vocab_size={vocab_size // 2}")
  path = model_prefix + ".model"
  Tokenizer.load(path)  # Checks the reserved ids landed where they must.
  logging.info("tokenizer: wrote %s (%d pieces) in %.0fs", path, vocab_size, time.perf_counter() - start)
  return path


def check_unknown_share(num_unknown: int, num_tokens: int, tokenizer_path: str) -> float:
  """The share of [UNK] tokens; above MAX_UNKNOWN_SHARE, a warning naming it and the fix."""
  share = num_unknown / max(num_tokens, 1)
  if share > MAX_UNKNOWN_SHARE:
    logging.warning(
        "%.1f%% of the corpus's tokens are [UNK] (%d of %d): the tokenizer %s does not cover its "
        "characters, and the model would learn to predict [UNK]. Train a tokenizer on this corpus "
        "(leave config.data.tokenizer empty, or tools/train_tokenizer.py).", 100 * share, num_unknown,
        num_tokens, tokenizer_path)
  return share


def _train(files, model_prefix, vocab_size, model_type, input_sentence_size, num_threads, strict):
  spm.SentencePieceTrainer.train(
      sentence_iterator=_training_text(files, strict),
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      model_type=model_type,
      input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True,
      max_sentence_length=1 << 16,  # Paragraphs, not sentences: don't drop long ones.
      num_threads=num_threads or os.cpu_count(),
      normalization_rule_name="nmt_nfkc_cf",
      character_coverage=1.0,  # books have few digits; 0.9995 would map them to [UNK]
      split_digits=True,
      pad_id=PAD_ID, pad_piece=SPECIAL_TOKENS[PAD_ID],
      unk_id=UNK_ID, unk_piece=SPECIAL_TOKENS[UNK_ID],
      bos_id=-1, eos_id=-1,
      user_defined_symbols=list(SPECIAL_TOKENS[CLS_ID:NUM_RESERVED]),
      minloglevel=2,
  )


class Tokenizer:
  """A loaded SentencePiece model whose ids 0..4 are the BERT special tokens."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str):
    self._sp = processor
    self.path = path

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"SentencePiece model not found: {path!r}. Train one with\n"
          f"  python tools/train_tokenizer.py --input='corpus/*.txt' --vocab_size=8000 --out=PREFIX\n"
          f"and pass PREFIX.model.")
    try:
      processor = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:  # truncated/corrupt file, or not a SentencePiece model
      raise ValueError(f"{path}: not a readable SentencePiece model ({e}); re-copy it or train one "
                       f"with tools/train_tokenizer.py.") from None
    pieces = tuple(processor.id_to_piece(i) for i in range(min(NUM_RESERVED, processor.get_piece_size())))
    if pieces != SPECIAL_TOKENS:
      raise ValueError(
          f"{path}: ids 0..4 are {pieces}, expected {SPECIAL_TOKENS}. spanlm needs these reserved "
          f"ids; train the model with tools/train_tokenizer.py.")
    return cls(processor, path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
    """Encodes in parallel in C++; `num_threads <= 0` uses all cores."""
    return self._sp.encode(texts, num_threads=num_threads if num_threads > 0 else -1)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids if i != PAD_ID])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def word_start_table(self) -> np.ndarray:
    """bool [vocab_size]: True where the piece starts a word (begins with '▁').

    Whole-word and span masking index this table with token ids on device to
    find word boundaries. Reserved ids are never word starts.
    """
    table = np.array([self._sp.id_to_piece(i).startswith(WORD_START) for i in range(self.vocab_size)])
    table[:NUM_RESERVED] = False
    return table
