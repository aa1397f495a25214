r"""Tokenizes and packs raw text into a spanlm TFDS array_record dataset.

  python tools/prepare_corpus.py --input='corpus/*.txt.gz' \
      --tokenizer=spanlm/data/sample/sample_sp8k.model --out=/tmp/corpus128 --seq_len=128
"""
import json

from absl import app, flags

from spanlm.data import prepare
from spanlm.metrics import quiet_library_logs

_INPUT = flags.DEFINE_string("input", None, "Files, folders or globs (comma-separated) of .txt/.txt.gz text.",
                             required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece .model (tools/train_tokenizer.py).",
                                 required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (new, empty, or a previous identical run).",
                           required=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Row length including [CLS] and [SEP].")
_VALIDATION_FRACTION = flags.DEFINE_float("validation_fraction", 0.01, "Share of rows held out.")
_NUM_THREADS = flags.DEFINE_integer("num_threads", 0, "Tokenizer threads; 0 uses all cores.")
_SKIP_BAD_FILES = flags.DEFINE_bool("skip_bad_files", False, "Skip unreadable files instead of failing.")
_PACKING = flags.DEFINE_enum("packing", "document", list(prepare.PACKING_MODES),
                             "Row layout: document | full_sentences | packed (spanlm/data/prepare.py).")


def main(argv):
  del argv
  quiet_library_logs()
  stats = prepare.prepare_corpus(
      _INPUT.value, _TOKENIZER.value, _OUT.value, _SEQ_LEN.value,
      validation_fraction=_VALIDATION_FRACTION.value, num_threads=_NUM_THREADS.value,
      strict=not _SKIP_BAD_FILES.value, packing=_PACKING.value)
  print(f"Prepared {stats['out_dir']}")
  print(f"  files: {stats['files_read']} read, {len(stats['files_skipped'])} skipped")
  for path, reason in stats["files_skipped"].items():
    print(f"    skipped {path}: {reason}")
  print(f"  {stats['paragraphs']:,} paragraphs, {stats['characters']:,} characters, {stats['tokens']:,} tokens")
  print(f"  train: {stats['train_rows']:,} rows ({stats['train_tokens']:,} tokens); "
        f"validation: {stats['validation_rows']:,} rows ({stats['validation_tokens']:,} tokens); "
        f"seq_len {stats['seq_len']}, vocab {stats['vocab_size']}, [UNK] {stats['unk_fraction']:.2%} of tokens")
  print(f"  packing {stats['packing']}: padding is {stats['train_pad_fraction']:.1%} of train token slots")
  print(f"  tokenize+pack: {stats['tokens_per_sec']:,} tokens/s; "
        f"overall: {stats['overall_tokens_per_sec']:,} tokens/s ({stats['total_seconds']:.1f}s)")
  print(json.dumps(stats))


if __name__ == "__main__":
  app.run(main)
