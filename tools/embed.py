"""Encode texts with a converted checkpoint and save the hidden states (and attention maps).

  python tools/embed.py --checkpoint=/tmp/minilm --input=texts.txt --out=emb.npz [--attentions]
  (--checkpoint and --out may be gs:// URLs)

--checkpoint: a converted checkpoint (tools/import_checkpoint.py) or a fine-tuning
workdir (its model/). --input: one text per line; empty lines are skipped and
counted. Writes input_ids, attention_mask [N, L] and last_hidden_state [N, L, H]
float32 (L = the longest text, at most --max_len), plus attentions
[N, layers, heads, L, L] with --attentions; prints a summary.
"""

import io
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CKPT = flags.DEFINE_string("checkpoint", None, "Converted checkpoint dir or fine-tuning workdir.", required=True)
_INPUT = flags.DEFINE_string("input", None, "Text file, one text per line.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output .npz.", required=True)
_ATTN = flags.DEFINE_bool("attentions", False, "Also save every layer's attention probabilities.")
_MAX_LEN = flags.DEFINE_integer("max_len", 128, "Longest input in tokens, [CLS]/[SEP] included.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Texts per forward pass.")


def main(argv):
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # JAX, TFDS and Orbax INFO lines only at --verbosity=1
  del argv
  import numpy as np

  from spanlm import convert

  from spanlm import paths
  path = _CKPT.value
  try:
    paths.check_bucket(path)  # a gs:// bucket that cannot be reached, or an unknown URL scheme: one line,
    paths.check_bucket(_OUT.value)  # before any work
    if not convert.is_converted(path) and convert.is_converted(paths.path(path) / "model"):
      path = str(paths.path(path) / "model")  # a fine-tuning workdir: its model/
    if not convert.is_converted(path):
      raise FileNotFoundError(f"{_CKPT.value!r} is not a converted checkpoint (no {convert.META_FILE}); "
                              f"run tools/import_checkpoint.py first")
    if not paths.is_file(_INPUT.value):  # local or gs://
      raise FileNotFoundError(f"--input={_INPUT.value!r} not found")
    text = io.StringIO(paths.read_text(_INPUT.value), newline=None)  # universal newlines, as open()'s
    lines = [line.rstrip("\n").rstrip("\r") for line in text]
    texts = [t for t in lines if t.strip()]
    if len(texts) < len(lines):
      print(f"skipped {len(lines) - len(texts)} empty lines of {len(lines)}")
    if not texts:
      raise ValueError(f"--input={_INPUT.value!r} has no non-empty lines")
    cfg, params, tok = convert.load_converted(path)
    out, report = convert.embed_texts(cfg, params, tok, texts, max_len=_MAX_LEN.value,
                                      batch_size=_BATCH.value, attentions=_ATTN.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  buf = io.BytesIO()
  np.savez(buf, **out)
  # --out may be a gs:// URL; like np.savez, a name without .npz gets it.
  paths.path(_OUT.value if _OUT.value.endswith(".npz") else _OUT.value + ".npz").write_bytes(buf.getvalue())
  shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in out.items())
  print(f"{len(texts)} texts ({report['truncated']} truncated to {_MAX_LEN.value} tokens) -> {_OUT.value}: {shapes}")


if __name__ == "__main__":
  app.run(main)
