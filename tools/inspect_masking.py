r"""Runs the configured masking on real prepared rows and shows what it did.

  python tools/inspect_masking.py --config=experiments/span_bert.py:tiny \
      --num_sequences=256 --out=/tmp/masking.npz

Writes [N, seq_len] arrays `token_ids`, `masked_ids`, `mask` (positions
predicted), `word_start`, `special` ([CLS]/[SEP]/[PAD]) and `span_id`; prints
the mask rate, the 80/10/10 split, mean span lengths, and one row with its
masked spans marked as [[original -> what the model sees]].
"""

import io
import json

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from spanlm import paths
from spanlm.objectives import masking
from spanlm.data import prepare
from spanlm.data.tokenizer import MASK_ID, Tokenizer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file[:preset].", lock_config=True)
_NUM = flags.DEFINE_integer("num_sequences", 256, "Rows of the prepared train split to mask.")
_OUT = flags.DEFINE_string("out", "masking.npz", "Output .npz file.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/spanlm_inspect", "Where raw text gets prepared.")
_SEED = flags.DEFINE_integer("seed", 0, "Masking RNG seed.")


def summarize(token_ids, masked_ids, mask, word_start, span_id) -> dict:
  """Mask rate, 80/10/10 split and span lengths (in words and tokens) over all rows."""
  maskable = ~np.asarray(masking.special_mask(token_ids))
  n = int(mask.sum())
  changed = masked_ids != token_ids
  spans_tokens, spans_words = [], []
  for row in range(len(token_ids)):
    for s in np.unique(span_id[row][span_id[row] >= 0]):
      where = span_id[row] == s
      spans_tokens.append(int(where.sum()))
      spans_words.append(int((where & word_start[row]).sum()))
  return {
      "sequences": int(len(token_ids)),
      "mask_rate": n / max(int(maskable.sum()), 1),
      "masked_tokens": n,
      "frac_mask_token": float((mask & (masked_ids == MASK_ID)).sum() / max(n, 1)),
      "frac_random": float((mask & changed & (masked_ids != MASK_ID)).sum() / max(n, 1)),
      "frac_kept": float((mask & ~changed).sum() / max(n, 1)),
      "num_spans": len(spans_tokens),
      "mean_span_words": float(np.mean(spans_words)) if spans_words else 0.0,
      "mean_span_tokens": float(np.mean(spans_tokens)) if spans_tokens else 0.0,
  }


def render(tokenizer, ids, masked_ids, mask) -> str:
  """The row as text, each masked span as [[original -> seen]]."""
  out, i = [], 0
  while i < len(ids) and ids[i] != 0:
    if mask[i]:
      j = i
      while j < len(ids) and mask[j]:
        j += 1
      orig = "".join(tokenizer.id_to_piece(int(t)) for t in ids[i:j]).replace("▁", " ")
      seen = "".join(tokenizer.id_to_piece(int(t)) for t in masked_ids[i:j]).replace("▁", " ")
      out.append(f" [[{orig.strip()} -> {seen.strip()}]]")
      i = j
    else:
      out.append(tokenizer.id_to_piece(int(ids[i])).replace("▁", " "))
      i += 1
  return "".join(out).strip()


def main(argv):
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # JAX, TFDS and Orbax INFO lines only at --verbosity=1
  del argv
  paths.check_bucket_or_exit(_OUT.value)  # a bad gs:// bucket: one line, before any work
  config = _CONFIG.value
  seq_len = config.train.seq_len
  data_dir = prepare.ensure_prepared(config.data.corpus, _WORKDIR.value, seq_len,
                                     tokenizer=config.data.tokenizer, vocab_size=config.data.vocab_size,
                                     validation_fraction=config.data.validation_fraction)
  dataset = prepare.load_prepared(data_dir)
  tokenizer = Tokenizer.load(dataset.tokenizer_path)
  n = min(_NUM.value, len(dataset.train))
  token_ids = np.stack([dataset.train[i]["input_ids"] for i in range(n)])
  table = tokenizer.word_start_table()
  fn = jax.jit(lambda rng, ids: masking.apply_masking(rng, ids, table, config.masking,
                                                       vocab_size=tokenizer.vocab_size))
  result = jax.device_get(fn(jax.random.PRNGKey(_SEED.value), token_ids))
  mask = result.weights > 0
  word_start = np.asarray(masking.word_starts(token_ids, table))
  special = np.asarray(masking.special_mask(token_ids))
  buf = io.BytesIO()
  np.savez_compressed(buf, token_ids=token_ids, masked_ids=result.input_ids, mask=mask,
                      word_start=word_start, special=special, span_id=result.span_id)
  # --out may be a gs:// URL; like np.savez_compressed, a name without .npz gets it.
  paths.path(_OUT.value if _OUT.value.endswith(".npz") else _OUT.value + ".npz").write_bytes(buf.getvalue())
  summary = summarize(token_ids, result.input_ids, mask, word_start, result.span_id)
  print(f"scheme={config.masking.scheme} rate={config.masking.rate} on {n} rows of {seq_len} tokens "
        f"from {data_dir}")
  print(f"  masked {summary['mask_rate']:.2%} of maskable tokens; [MASK] {summary['frac_mask_token']:.1%} / "
        f"random {summary['frac_random']:.1%} / kept {summary['frac_kept']:.1%}")
  print(f"  {summary['num_spans']} masked units, mean length {summary['mean_span_words']:.2f} words = "
        f"{summary['mean_span_tokens']:.2f} tokens")
  print("  example:", render(tokenizer, token_ids[0], result.input_ids[0], mask[0])[:1200])
  print(json.dumps({"out": _OUT.value, **summary}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
