"""Classify every attention head's pattern (Kovaleva et al. 2019) on real text.

  python tools/analyze_heads.py --checkpoint=DIR --text='corpus/*.txt' --out=heads/

--checkpoint: an HF BERT directory (config.json, model.safetensors, vocab.txt),
a converted checkpoint (tools/import_checkpoint.py) or a spanlm pretraining
--workdir. Inputs are [CLS] A [SEP] B [SEP] pairs of consecutive sentences, so
'block' means attention within the own sentence. Writes heads.json, heads.md
(layer x head table) and attention_maps.png; the rules and thresholds are in
spanlm/heads_analysis.py (rule-based features, not the paper's CNN).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def load_encoder(path: str):
  """(BertConfig, encoder params, tokenizer) from any of the three checkpoint kinds (local or gs://)."""
  from spanlm import convert, paths
  from spanlm import workdir as workdir_lib
  from spanlm.data import wordpiece

  paths.check_bucket(path)  # a gs:// bucket that cannot be reached: one line
  if convert.is_converted(path):
    return convert.load_converted(path)
  if (paths.path(path) / "model.safetensors").exists():
    with tempfile.TemporaryDirectory() as tmp:
      return convert.load_converted(convert.import_hf(path, os.path.join(tmp, "converted")))
  wd = workdir_lib.Workdir(path)
  if wd.has_config() and wd.has_checkpoints():
    from spanlm import configs
    from spanlm.objectives import base as pretraining
    saved, tok_path, _, params = workdir_lib.load_pretrained(path)  # digest-checked, with fallback
    config = configs.base_config()
    config.unlock()
    config.update_from_flattened_dict(_flatten(saved.to_dict()))  # keys this version knows
    tok = wordpiece.load_tokenizer(tok_path)
    return pretraining.encoder_config(config, tok.vocab_size), params["encoder"], tok
  raise ValueError(f"{path!r} is neither an HF BERT directory, a converted checkpoint nor a spanlm workdir")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--text", default="", help="glob of .txt/.txt.gz files (default: the bundled sample)")
  parser.add_argument("--num_examples", type=int, default=32)
  parser.add_argument("--max_len", type=int, default=64)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)

  from spanlm import heads_analysis as ha
  from spanlm import paths
  from spanlm.data import corpus, sample

  try:
    paths.check_bucket(args.out)
    cfg, params, tok = load_encoder(args.checkpoint)
    files = corpus.resolve_files(args.text) if args.text else sample.corpus_files()
    texts = [p for doc in corpus.read_documents(files) for p in doc.paragraphs]
    ids, seg, mask, special, lengths = ha.sentence_pairs(tok, texts, args.max_len, args.num_examples)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  probs = ha.attention_probs(cfg, params, ids, seg, mask)
  result = ha.classify_heads(probs, special, seg, lengths)
  title = f"{os.path.basename(os.path.normpath(args.checkpoint))}, {len(ids)} sentence pairs"
  summary = ha.write_report(result, probs, special, lengths, args.out, title)
  print((paths.path(args.out) / "heads.md").read_text())
  print(f"wrote {args.out}/heads.json, heads.md, attention_maps.png "
        f"({cfg.num_layers} layers x {cfg.num_heads} heads; share: "
        + ", ".join(f"{p} {v:.0%}" for p, v in summary["share"].items()) + ")")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
