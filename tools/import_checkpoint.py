"""Convert BERT checkpoints between Hugging Face's layout and spanlm's.

  # HF (config.json, model.safetensors, vocab.txt) -> spanlm converted checkpoint
  python tools/import_checkpoint.py --format=hf --src=HF_DIR --out=/tmp/minilm
  # spanlm converted checkpoint (or a fine-tuning workdir's model/) -> HF layout
  python tools/import_checkpoint.py --to=hf --src=/tmp/minilm --out=/tmp/minilm_hf
  # --src and --out may be gs:// URLs (gs://bucket/minilm)

Only safetensors are read (pickled pytorch_model.bin is refused). Prints a
summary and writes OUT/conversion.json.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_FORMAT = flags.DEFINE_enum("format", "hf", ["hf"], "Format of --src when importing.")
_TO = flags.DEFINE_enum("to", "spanlm", ["spanlm", "hf"], "spanlm: import --src; hf: export a converted --src.")
_SRC = flags.DEFINE_string("src", None, "Source directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)


def check_out(path: str) -> None:
  """A clear error for an --out that exists and is not a directory (a local path or gs:// URL)."""
  from spanlm import paths
  p = paths.path(path)  # an unknown URL scheme is one line here
  paths.check_bucket(path)  # so is a gs:// bucket that cannot be reached
  if not paths.is_remote(p) and p.exists() and not p.is_dir():
    raise ValueError(f"--out={path} is a file, not a directory; give a directory (it is created if missing)")


def main(argv):
  del argv
  import numpy as np

  from spanlm import convert
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # Orbax logs ~40 INFO lines per save

  try:
    from spanlm import paths
    paths.check_bucket(_SRC.value)
    check_out(_OUT.value)
    if _TO.value == "spanlm":
      out = convert.import_hf(_SRC.value, _OUT.value)
    else:
      if not convert.is_converted(_SRC.value):
        raise FileNotFoundError(f"{_SRC.value!r} is not a converted spanlm checkpoint (no "
                                f"{convert.META_FILE}); import one first or use a fine-tuning workdir's model/")
      out = convert.export_hf(_SRC.value, _OUT.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  src = out if _TO.value == "spanlm" else _SRC.value
  cfg, params, tok = convert.load_converted(src)
  import jax
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  summary = {"src": _SRC.value, "out": out, "direction": f"{_FORMAT.value if _TO.value == 'spanlm' else 'spanlm'}"
             f"->{_TO.value}", "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
             "num_heads": cfg.num_heads, "vocab_size": cfg.vocab_size, "tokenizer_size": tok.vocab_size,
             "parameters": n, "special_ids": {"pad": tok.pad_id, "unk": tok.unk_id, "cls": tok.cls_id,
                                              "sep": tok.sep_id, "mask": tok.mask_id}}
  from spanlm import paths
  (paths.path(out) / "conversion.json").write_text(json.dumps(summary, indent=2))
  print(f"{summary['direction']}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
        f"vocab {cfg.vocab_size} ({tok.vocab_size} in the tokenizer), {n / 1e6:.1f}M parameters -> {out}")


if __name__ == "__main__":
  app.run(main)
