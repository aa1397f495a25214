"""BERT's WordPiece tokenizer, and one interface over WordPiece and SentencePiece.

WordPiece (Schuster & Nakajima 2012; Devlin et al. 2019, as in google-research/
bert `tokenization.py`) runs in two stages:

  1. basic tokenization: drop NUL, U+FFFD and control characters, map
     whitespace to ' ', put spaces around CJK ideographs, split on whitespace;
     for uncased vocabularies lower-case and strip accents (NFD, then drop
     combining marks, category Mn); split off every punctuation character
     (ASCII symbols and Unicode category P*).
  2. greedy longest-match-first WordPiece over each word: the longest vocabulary
     prefix, then the longest '##'-prefixed continuation, and so on; a word with
     no segmentation, or longer than 200 characters, becomes [UNK] as a whole.

Both tokenizers expose: `vocab_size`, `encode(text) -> ids`, `tokenize(text) ->
pieces`, the special ids `pad_id unk_id cls_id sep_id mask_id` and
`word_start_table()`. Code that builds model inputs must take the special ids
from the tokenizer: BERT's vocabulary has [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102
[MASK]=103, spanlm's SentencePiece models 0..4.
"""

from __future__ import annotations

import functools
import json
import os
import unicodedata

import numpy as np

from spanlm.data import tokenizer as sp_tokenizer

SAMPLE_TOKENIZER = os.path.join(os.path.dirname(__file__), "sample", "sample_sp8k.model")
MAX_WORD_CHARS = 200  # longer words become [UNK] (google-research/bert tokenization.py: max_input_chars_per_word=200)


def _is_whitespace(ch: str) -> bool:
  return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
  return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  # All non-letter/number ASCII counts ('$', '^', '`' are not Unicode P*), as in BERT.
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
  """CJK Unified Ideographs blocks (not Hangul/Kana, which are space-separated)."""
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
          or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
          or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _normalize(text: str, lower: bool) -> str:
  if not lower:
    return text
  # Character-wise lower(), as the checkpoints' own tokenizer.json (HF `tokenizers`) does; str.lower()
  # on a whole word would apply the Greek final-sigma rule (ΟΔΟΣ -> οδος with ς) and differ from it.
  lowered = "".join(c.lower() for c in text)
  return "".join(c for c in unicodedata.normalize("NFD", lowered) if unicodedata.category(c) != "Mn")


class WordPieceTokenizer:
  """A BERT `vocab.txt` (one piece per line, id = line number)."""

  def __init__(self, vocab: list[str], do_lower_case: bool = True, path: str = "",
               max_word_chars: int = MAX_WORD_CHARS):
    self.vocab = vocab
    self.max_word_chars = max_word_chars
    self.index = {p: i for i, p in enumerate(vocab)}
    self.do_lower_case = do_lower_case
    self.path = path
    self.num_oov_ids = 0  # ids mapped to [UNK] because they exceed `limit_vocab` (counted, logged)
    self._limit = len(vocab)
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in self.index]
    if missing:
      raise ValueError(f"WordPiece vocabulary {path or ''} lacks the special tokens {missing}; "
                       f"a BERT vocab.txt has [PAD] [UNK] [CLS] [SEP] [MASK]")
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        self.index[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))
    self._wordpiece = functools.lru_cache(maxsize=1 << 16)(self._wordpiece_uncached)

  @classmethod
  def load(cls, path: str, do_lower_case: bool | None = None) -> WordPieceTokenizer:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"WordPiece vocabulary {path!r} not found (a BERT vocab.txt)")
    with open(path, encoding="utf-8") as f:
      vocab = [line.rstrip("\n").rstrip("\r") for line in f]
    while vocab and not vocab[-1]:
      vocab.pop()
    if do_lower_case is None:  # HF keeps it in tokenizer_config.json beside vocab.txt; BERT default: True
      cfg = os.path.join(os.path.dirname(path), "tokenizer_config.json")
      do_lower_case = True
      if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
          do_lower_case = bool(json.load(f).get("do_lower_case", True))
    # A Hugging Face checkpoint's tokenizer.json states its own limit (100 in HF's WordPiece); a
    # bare vocab.txt gets Google's (200).
    max_word_chars = MAX_WORD_CHARS
    hf = os.path.join(os.path.dirname(path), "tokenizer.json")
    if os.path.isfile(hf):
      try:
        with open(hf, encoding="utf-8") as f:
          max_word_chars = int(json.load(f)["model"]["max_input_chars_per_word"])
      except (KeyError, TypeError, ValueError):
        pass
    return cls(vocab, do_lower_case, path, max_word_chars)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def limit_vocab(self, n: int) -> None:
    """Map ids >= n to [UNK] (a vocabulary larger than the model's embedding table)."""
    self._limit = n

  # --- basic tokenization with character offsets ---------------------------------------------
  def _words(self, text: str) -> list[tuple[str, int, int]]:
    """(normalized word, start, end) with [start, end) the word's span in `text`."""
    out, chars = [], []  # chars: (char, original index) of the current whitespace token

    def flush():
      if chars:
        out.extend(self._split_token(chars))
        chars.clear()

    for i, ch in enumerate(text):
      cp = ord(ch)
      if cp == 0 or cp == 0xFFFD or _is_control(ch):
        continue  # removed without splitting the word, as BERT's _clean_text does
      if _is_whitespace(ch):
        flush()
      elif _is_cjk(cp):
        flush()
        out.append((ch, i, i + 1))
      else:
        chars.append((ch, i))
    flush()
    return out

  def _split_token(self, chars):
    """Normalize one whitespace token and split off its punctuation, keeping offsets."""
    raw = "".join(c for c, _ in chars)
    norm = _normalize(raw, self.do_lower_case)
    # Character-wise normalization gives each normalized char its source index; if it differs
    # from whole-token normalization (NFD reordering marks) every piece gets the token's span.
    per_char = [(n, i) for c, i in chars for n in _normalize(c, self.do_lower_case)]
    if "".join(n for n, _ in per_char) == norm:
      starts = [i for _, i in per_char]
      ends = [i + 1 for _, i in per_char]
    else:
      starts = [chars[0][1]] * len(norm)
      ends = [chars[-1][1] + 1] * len(norm)
    words, cur = [], []
    for j, ch in enumerate(norm):
      if _is_punctuation(ch):
        if cur:
          words.append(cur)
        words.append([j])
        cur = []
      else:
        cur.append(j)
    if cur:
      words.append(cur)
    return [("".join(norm[j] for j in w), starts[w[0]], ends[w[-1]]) for w in words]

  # --- WordPiece --------------------------------------------------------------------------------
  def _wordpiece_uncached(self, word: str) -> tuple[tuple[str, int], ...]:
    """Greedy longest-match-first pieces of one word, each with its length in characters."""
    if len(word) > self.max_word_chars:
      return (("[UNK]", len(word)),)
    pieces, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self.index:
          break
        end -= 1
      if end == start:
        return (("[UNK]", len(word)),)
      pieces.append((piece, end - start))
      start = end
    return tuple(pieces)

  def tokenize(self, text: str) -> list[str]:
    return [p for w, _, _ in self._words(text) for p, _ in self._wordpiece(w)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each piece's [start, end) character span in `text` (for span extraction)."""
    ids, spans = [], []
    for word, start, end in self._words(text):
      pieces = self._wordpiece(word)
      exact = sum(n for _, n in pieces) == end - start
      pos = start
      for piece, n in pieces:
        ids.append(self._id(piece))
        spans.append((pos, pos + n) if exact else (start, end))
        pos += n
    return ids, spans

  def _id(self, piece: str) -> int:
    i = self.index[piece]
    if i >= self._limit:
      self.num_oov_ids += 1
      return self.unk_id
    return i

  def encode(self, text: str) -> list[int]:
    return [self._id(p) for p in self.tokenize(text)]

  def id_to_piece(self, i: int) -> str:
    return self.vocab[int(i)]

  def decode(self, ids) -> str:
    out = []
    for i in ids:
      if int(i) == self.pad_id:
        continue
      p = self.vocab[int(i)]
      if p.startswith("##") and out:
        out[-1] += p[2:]
      else:
        out.append(p)
    return " ".join(out)

  def word_start_table(self) -> np.ndarray:
    """bool [vocab_size]: True for pieces that begin a word (no '##'); special tokens False."""
    table = np.array([not p.startswith("##") for p in self.vocab])
    for i in (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id):
      table[i] = False
    return table


class SentencePieceTokenizer(sp_tokenizer.Tokenizer):
  """spanlm's SentencePiece tokenizer with the common interface's special-id attributes."""

  pad_id, unk_id, cls_id, sep_id, mask_id = (sp_tokenizer.PAD_ID, sp_tokenizer.UNK_ID, sp_tokenizer.CLS_ID,
                                             sp_tokenizer.SEP_ID, sp_tokenizer.MASK_ID)
  num_oov_ids = 0

  def tokenize(self, text: str) -> list[str]:
    return [self.id_to_piece(i) for i in self.encode(text)]

  def encode_with_offsets(self, text: str):
    raise NotImplementedError("character offsets are implemented for WordPiece only; "
                              "span tasks need a WordPiece (BERT) checkpoint")

  def limit_vocab(self, n: int) -> None:
    if n < self.vocab_size:
      raise ValueError(f"SentencePiece model {self.path} has {self.vocab_size} pieces but the model's "
                       f"embedding table only {n} rows; use the tokenizer the model was trained with")


def load_tokenizer(path: str):
  """WordPiece for a vocab.txt (or a directory holding one), SentencePiece for a .model file."""
  if os.path.isdir(path):
    for name in ("vocab.txt", "tokenizer.model"):
      if os.path.isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
    if models:
      return load_tokenizer(os.path.join(path, models[0]))
    raise FileNotFoundError(f"no tokenizer (vocab.txt or *.model) in directory {path!r}")
  if path.endswith(".model"):
    tok = sp_tokenizer.Tokenizer.load(path)
    return SentencePieceTokenizer(tok._sp, path)
  return WordPieceTokenizer.load(path)
