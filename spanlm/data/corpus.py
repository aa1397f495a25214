"""Raw text corpus reading: file globs -> documents of paragraphs.

One file is one document. Documents are the unit that packed rows never cross
(see `prepare.py`), so a corpus of many books should be many files. Each file
is read whole, which is fine for books and web shards of a few hundred MB.

Bad files (empty, binary, not UTF-8, corrupt gzip) are an error by default,
because a silently smaller corpus is worse than a loud failure; `strict=False`
skips them with a warning and records why in `CorpusStats`.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import os
import re
import zlib
from collections.abc import Iterator, Sequence

from absl import logging

_SKIP_HINT = ("Remove it from the corpus, or skip bad files with --config.data.skip_bad_files=True "
              "(spanlm.main) / --skip_bad_files (tools/*.py).")
TEXT_SUFFIXES = (".txt", ".txt.gz")

# Project Gutenberg wraps each book in a licence header/footer delimited by
# '*** START OF THE PROJECT GUTENBERG EBOOK ... ***' / '*** END OF ...'.
_PG_START = re.compile(r"^\s*\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*$", re.M | re.I)
_PG_END = re.compile(r"^\s*\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*$", re.M | re.I)
# ...and usually ends the book with an 'End of (the) Project Gutenberg EBook of X' paragraph.
_PG_END_NOTE = re.compile(r"\n\s*End of (?:the )?Project Gutenberg[^\n]*(?:\n[^\n]*\S[^\n]*)*\s*\Z", re.I)
# C0/C1 control characters other than \t \n \v \f \r, and the U+FFFD replacement char.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")
_MAX_CONTROL_FRACTION = 0.01


class CorpusError(ValueError):
  """A corpus file is unusable, or no usable text remains."""


@dataclasses.dataclass(frozen=True)
class Document:
  path: str
  paragraphs: list[str]


@dataclasses.dataclass
class CorpusStats:
  """What `read_documents` read and skipped; filled in as documents are consumed."""
  files_read: int = 0
  files_skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> reason
  paragraphs: int = 0
  characters: int = 0


def _resolve_remote(pattern: str) -> list[str]:
  """The files a gs:// file, folder or glob names (`gs://bucket/books/*.txt`)."""
  from spanlm import paths
  root = paths.path(pattern)  # an unknown URL scheme is one line here
  if any(c in pattern for c in "*?["):
    matches = [m for m in paths.glob(pattern) if not paths.is_dir(m)]
  else:
    try:
      if root.is_dir():
        matches = [str(m) for m in root.iterdir() if str(m).endswith(TEXT_SUFFIXES) and not m.is_dir()]
      else:
        matches = [pattern] if root.exists() else []
    except Exception as e:  # noqa: BLE001  (gcsfs/google-auth raise their own types)
      raise paths.access_error(pattern, e) from e
  if not matches:
    raise FileNotFoundError(f"No files match {pattern!r} (for a gs:// folder, its .txt/.txt.gz files).")
  return matches


def resolve_files(pattern_or_list: str | Sequence[str]) -> list[str]:
  """Expands files, folders (their .txt/.txt.gz files), globs, comma-separated or a list, to sorted files.

  Each may be local or a gs:// URL (`gs://bucket/books/*.txt`)."""
  patterns = pattern_or_list.split(",") if isinstance(pattern_or_list, str) else list(pattern_or_list)
  patterns = [p.strip() if "://" in p else os.path.expanduser(p.strip()) for p in patterns if p.strip()]
  if not patterns:
    raise FileNotFoundError(f"No corpus files given (pattern {pattern_or_list!r} is empty).")
  files = set()
  for pattern in patterns:
    if "://" in pattern:
      files.update(_resolve_remote(pattern))
      continue
    if os.path.isdir(pattern):
      matches = [f for f in glob.glob(os.path.join(pattern, "*")) if f.endswith(TEXT_SUFFIXES) and os.path.isfile(f)]
      if not matches:
        raise FileNotFoundError(f"Folder {pattern!r} holds no .txt or .txt.gz files (nor a prepared spanlm "
                                f"dataset); pass a glob of your text files, e.g. '{os.path.join(pattern, '*.md')}'.")
      files.update(matches)
      continue
    matches = [f for f in glob.glob(pattern) if os.path.isfile(f)]
    if not matches:
      raise FileNotFoundError(f"No files match {pattern!r} (cwd: {os.getcwd()}).")
    files.update(matches)
  return sorted(files)


def strip_gutenberg(text: str) -> str:
  """Returns the book text between the Project Gutenberg START/END markers, if present."""
  if start := _PG_START.search(text):
    text = text[start.end():]
  if end := _PG_END.search(text):
    text = text[:end.start()]
  return _PG_END_NOTE.sub("\n", text)


def split_paragraphs(text: str) -> list[str]:
  """Blank-line separated paragraphs, each with its whitespace collapsed to single spaces."""
  paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
  return [p for p in paragraphs if p]


def read_text(path: str) -> str:
  """Reads a .txt or .txt.gz file (local or gs://) as UTF-8, raising CorpusError for unusable files."""
  if "://" in path:
    from spanlm import paths
    try:
      raw = paths.path(path).read_bytes()
    except Exception as e:  # noqa: BLE001
      raise paths.access_error(path, e) from e
  else:
    with open(path, "rb") as f:
      raw = f.read()
  if path.endswith(".gz"):
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise CorpusError(f"{path}: not a valid gzip file ({e}). {_SKIP_HINT}") from e
  if not raw.strip():
    raise CorpusError(f"{path}: file is empty (no text). {_SKIP_HINT}")
  if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # a UTF-16 byte-order mark (Windows 'Unicode' text)
    raise CorpusError(f"{path}: is UTF-16, not UTF-8; convert it, e.g. `iconv -f utf-16 -t utf-8`. "
                      f"{_SKIP_HINT}")
  if b"\x00" in raw:
    raise CorpusError(f"{path}: contains NUL bytes, so it looks like a binary file, not text. {_SKIP_HINT}")
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise CorpusError(
        f"{path}: not valid UTF-8 (bad byte {raw[e.start]:#04x} at offset {e.start}); "
        f"convert it, e.g. `iconv -f latin1 -t utf-8`. {_SKIP_HINT}") from e
  num_control = len(_CONTROL.findall(text))
  if num_control > _MAX_CONTROL_FRACTION * len(text):
    raise CorpusError(
        f"{path}: {num_control / len(text):.0%} of its characters are control characters, "
        f"so it looks like a binary file, not text. {_SKIP_HINT}")
  return text.replace("\r\n", "\n").replace("\r", "\n")


def read_documents(files: Sequence[str], strict: bool = True,
                   stats: CorpusStats | None = None) -> Iterator[Document]:
  """Yields one Document per usable file, Gutenberg boilerplate stripped.

  Args:
    files: paths, e.g. from `resolve_files`.
    strict: raise CorpusError on the first bad file; otherwise skip it with a
      warning and record it in `stats.files_skipped`.
    stats: optional accounting object, updated as documents are yielded.

  Raises:
    CorpusError: a bad file when strict, or (always) no usable text at all.
  """
  stats = CorpusStats() if stats is None else stats
  for path in files:
    try:
      paragraphs = split_paragraphs(strip_gutenberg(read_text(path)))
      if not paragraphs:
        raise CorpusError(f"{path}: no text left after removing Project Gutenberg boilerplate. {_SKIP_HINT}")
    except CorpusError as e:
      if strict:
        raise
      logging.warning("Skipping bad corpus file: %s", e)
      stats.files_skipped[path] = str(e)
      continue
    stats.files_read += 1
    stats.paragraphs += len(paragraphs)
    stats.characters += sum(map(len, paragraphs))
    yield Document(path, paragraphs)
  if not stats.files_read:
    reasons = "\n  ".join(stats.files_skipped.values()) or "no files given"
    raise CorpusError(f"No usable text in {len(files)} corpus file(s):\n  {reasons}")


def iter_paragraphs(files: Sequence[str], strict: bool = True) -> Iterator[str]:
  """All paragraphs of all documents, e.g. as a SentencePiece training iterator."""
  for doc in read_documents(files, strict=strict):
    yield from doc.paragraphs
