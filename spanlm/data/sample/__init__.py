"""A small bundled corpus: ten public-domain Project Gutenberg books (see ATTRIBUTION.md).

Lets the framework run end to end with no downloads: `ensure_prepared('')`
tokenizes these with the shipped `sample_sp8k.model` (8k unigram, uncased).
"""
from pathlib import Path

_DIR = Path(__file__).parent


def corpus_files() -> list[str]:
  """Sorted paths of the bundled `.txt.gz` books."""
  return sorted(str(p) for p in _DIR.glob("*.txt.gz"))


def tokenizer_path() -> str:
  """Path of the SentencePiece model trained on the bundled books."""
  return str(_DIR / "sample_sp8k.model")
