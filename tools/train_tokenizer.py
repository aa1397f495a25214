r"""Trains a SentencePiece tokenizer with spanlm's reserved ids ([PAD]=0 ... [MASK]=4).

  python tools/train_tokenizer.py --input='corpus/*.txt.gz' --vocab_size=8000 --out=/tmp/sp8k
"""
import time

from absl import app, flags

from spanlm.data import tokenizer as tokenizer_lib
from spanlm.metrics import quiet_library_logs

_INPUT = flags.DEFINE_string("input", None, "Files, folders or globs (comma-separated) of .txt/.txt.gz text.",
                             required=True)
_OUT = flags.DEFINE_string("out", None, "Output prefix: writes PREFIX.model and PREFIX.vocab.", required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000, "Vocabulary size, including the 5 reserved tokens.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece model type.")
_INPUT_SENTENCE_SIZE = flags.DEFINE_integer("input_sentence_size", 2_000_000, "Max paragraphs sampled.")
_SKIP_BAD_FILES = flags.DEFINE_bool("skip_bad_files", False, "Skip unreadable files instead of failing.")


def main(argv):
  del argv
  quiet_library_logs()
  start = time.perf_counter()
  path = tokenizer_lib.train_sentencepiece(
      _INPUT.value, _OUT.value, _VOCAB_SIZE.value, model_type=_MODEL_TYPE.value,
      input_sentence_size=_INPUT_SENTENCE_SIZE.value, strict=not _SKIP_BAD_FILES.value)
  tok = tokenizer_lib.Tokenizer.load(path)
  example = "The quick brown fox jumps over the lazy dog."
  pieces = [tok.id_to_piece(i) for i in tok.encode(example)]
  print(f"Wrote {path} ({_MODEL_TYPE.value}, vocab {tok.vocab_size}) in {time.perf_counter() - start:.1f}s")
  print(f"Reserved ids: {[tok.id_to_piece(i) for i in range(tokenizer_lib.NUM_RESERVED)]}")
  print(f"Word starts: {int(tok.word_start_table().sum())}/{tok.vocab_size} pieces")
  print(f"Example: {' '.join(pieces)}")


if __name__ == "__main__":
  app.run(main)
