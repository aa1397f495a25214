r"""Parameters, training FLOPs per token and a module table of an experiment's model, as JSON.

  python tools/model_summary.py --config=experiments/albert.py --vocab_size=30000
  python tools/model_summary.py --config=experiments/bert.py:nsp --vocab_size=30522 --out=bert.json

Nothing is initialised (shapes via jax.eval_shape), so BERT-large costs no memory.
Counts follow the papers' convention (encoder incl. pooler, heads separate);
formulas in spanlm/summary.py. --vocab_size defaults to config.data.vocab_size;
embedding rows are not padded (vocab_multiple=1) unless --padded.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from spanlm import paths, summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file[:preset].", lock_config=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0 = config.data.vocab_size).")
_PADDED = flags.DEFINE_bool("padded", False, "Pad embedding rows to config.model.vocab_multiple.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON here.")
_TABLE = flags.DEFINE_bool("shapes", False, "Include every parameter's shape in the layer table.")


def main(argv):
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # JAX, TFDS and Orbax INFO lines only at --verbosity=1
  del argv
  paths.check_bucket_or_exit(_OUT.value)
  config = _CONFIG.value
  if not _PADDED.value:
    with config.unlocked():
      config.model.vocab_multiple = 1
  out = summary.summarize(config, _VOCAB.value or int(config.data.vocab_size))
  if not _TABLE.value:
    for row in out["layers"]:
      row.pop("shapes", None)
  text = json.dumps(out, indent=2)
  print(text)
  if _OUT.value:
    paths.write_text_atomic(_OUT.value, text + "\n")  # local or gs://
  p, f = out["parameters"], out.get("flops", {})
  print(f"# encoder {p['encoder'] / 1e6:.2f}M (embedding {p['embedding'] / 1e6:.2f}M, "
        f"non-embedding {p['non_embedding'] / 1e6:.2f}M), heads {p['heads'] / 1e6:.2f}M; "
        f"training {f.get('train', float('nan')) / 1e9:.3f} GFLOPs/token")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
