"""Hugging Face BERT checkpoints <-> spanlm encoder parameters.

A *converted checkpoint* is a directory:
  spanlm_model.json   the BertConfig fields (+ format version, tokenizer file name)
  params/             the encoder's parameters, an orbax checkpoint (a nested dict of arrays)
  vocab.txt | *.model the tokenizer (WordPiece or SentencePiece)

The HF layout is config.json + model.safetensors + vocab.txt. Tensors are read
and written with `safetensors.numpy` only: pickled PyTorch files
(pytorch_model.bin) are refused, since unpickling runs arbitrary code.

The mapping is a relabelling plus transposes and reshapes: a torch Linear holds
W [out, in] and computes x W^T + b; flax Dense holds kernel [in, out]. The
attention projections are DenseGeneral with kernel [H, heads, head_dim]
(query/key/value) and [heads, head_dim, H] (output), i.e. W^T split per head.

Converted checkpoints store the unrolled layout (`layer_0 ...`, as HF numbers its
layers); a scanned model's stacked `layers` are unstacked on save and export, and
`load_converted` stacks them again when the config scans its layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile

import flax.traverse_util as tu
import numpy as np
from absl import logging

from spanlm import paths
from spanlm.models.bert import BertConfig, to_layout, unstack_layers

FORMAT_VERSION = 1
META_FILE = "spanlm_model.json"
_SERIALIZED = ("vocab_size", "num_layers", "hidden_size", "num_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size", "dropout_rate", "layer_norm_eps",
               "initializer_range", "use_pooler")


# --- configs -------------------------------------------------------------------------------------
def config_from_hf(hf: dict) -> BertConfig:
  """BertConfig from an HF config.json (BERT architecture, absolute positions, exact GELU)."""
  if hf.get("model_type", "bert") != "bert":
    raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; only 'bert' checkpoints convert")
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"config.json has hidden_act={hf['hidden_act']!r}; spanlm's encoder uses exact GELU")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError("config.json: only position_embedding_type='absolute' is supported")
  return BertConfig(
      vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
      num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf.get("max_position_embeddings", 512),
      type_vocab_size=hf.get("type_vocab_size", 2), dropout_rate=hf.get("hidden_dropout_prob", 0.1),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12), initializer_range=hf.get("initializer_range", 0.02),
      use_pooler=True)


def config_to_hf(cfg: BertConfig, pad_id: int = 0) -> dict:
  return {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
          "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout_rate,
          "attention_probs_dropout_prob": cfg.dropout_rate,
          "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
          "initializer_range": cfg.initializer_range, "layer_norm_eps": cfg.layer_norm_eps,
          "pad_token_id": pad_id, "position_embedding_type": "absolute"}


def with_overrides(cfg: BertConfig, **kw) -> BertConfig:
  return dataclasses.replace(cfg, **kw)


# --- parameters ----------------------------------------------------------------------------------
def _hf_names(cfg: BertConfig, with_pooler: bool):
  """(spanlm path, HF name, to_spanlm(W), to_hf(kernel)) for every encoder tensor."""
  h, n, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  same = (lambda w: w, lambda k: k)
  linear = (lambda w: w.T, lambda k: k.T)
  qkv = (lambda w: w.T.reshape(h, n, d), lambda k: k.reshape(h, n * d).T)
  qkv_bias = (lambda b: b.reshape(n, d), lambda b: b.reshape(n * d))
  out = (lambda w: w.T.reshape(n, d, h), lambda k: k.reshape(n * d, h).T)
  rows = [
      (("embeddings", "word_embeddings"), "embeddings.word_embeddings.weight", *same),
      (("embeddings", "position_embeddings"), "embeddings.position_embeddings.weight", *same),
      (("embeddings", "token_type_embeddings"), "embeddings.token_type_embeddings.weight", *same),
      (("embeddings", "layer_norm", "scale"), "embeddings.LayerNorm.weight", *same),
      (("embeddings", "layer_norm", "bias"), "embeddings.LayerNorm.bias", *same),
  ]
  for i in range(cfg.num_layers):
    L, p = f"layer_{i}", f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      rows.append(((L, "attention", name, "kernel"), p + f"attention.self.{name}.weight", *qkv))
      rows.append(((L, "attention", name, "bias"), p + f"attention.self.{name}.bias", *qkv_bias))
    rows += [
        ((L, "attention", "output", "kernel"), p + "attention.output.dense.weight", *out),
        ((L, "attention", "output", "bias"), p + "attention.output.dense.bias", *same),
        ((L, "attention_norm", "scale"), p + "attention.output.LayerNorm.weight", *same),
        ((L, "attention_norm", "bias"), p + "attention.output.LayerNorm.bias", *same),
        ((L, "intermediate", "kernel"), p + "intermediate.dense.weight", *linear),
        ((L, "intermediate", "bias"), p + "intermediate.dense.bias", *same),
        ((L, "output", "kernel"), p + "output.dense.weight", *linear),
        ((L, "output", "bias"), p + "output.dense.bias", *same),
        ((L, "output_norm", "scale"), p + "output.LayerNorm.weight", *same),
        ((L, "output_norm", "bias"), p + "output.LayerNorm.bias", *same),
    ]
  if with_pooler:
    rows += [(("pooler", "kernel"), "pooler.dense.weight", *linear),
             (("pooler", "bias"), "pooler.dense.bias", *same)]
  return rows


def _canonical(name: str) -> str:
  """Strip a 'bert.' prefix and map TF-era LayerNorm gamma/beta to weight/bias."""
  if name.startswith("bert."):
    name = name[len("bert."):]
  return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: BertConfig) -> dict:
  """Encoder params (nested dict of float32 numpy) from HF tensors; unused ones are logged."""
  named = {_canonical(k): v for k, v in tensors.items()}
  has_pooler = "pooler.dense.weight" in named
  flat, used = {}, set()
  for path, hf, to_spanlm, _ in _hf_names(cfg, has_pooler):
    if hf not in named:
      raise ValueError(f"checkpoint lacks tensor {hf!r} required by its config.json "
                       f"({cfg.num_layers} layers); is it a BERT encoder checkpoint?")
    flat[path] = np.ascontiguousarray(to_spanlm(np.asarray(named[hf], np.float32)))
    used.add(hf)
  ignored = sorted(k for k in named if k not in used and k != "embeddings.position_ids")
  if ignored:
    logging.warning("ignored %d checkpoint tensors that are not encoder parameters (e.g. pretraining "
                    "heads): %s", len(ignored), ", ".join(ignored[:8]) + (" ..." if len(ignored) > 8 else ""))
  if not has_pooler:
    logging.warning("checkpoint has no pooler; classification heads will initialise it")
  return tu.unflatten_dict(flat)


def params_to_hf(params: dict, cfg: BertConfig) -> dict[str, np.ndarray]:
  """HF tensors from encoder params in either layout (scanned `layers` or unrolled `layer_i`)."""
  flat = tu.flatten_dict(unstack_layers(params))
  return {hf: np.ascontiguousarray(to_hf(np.asarray(flat[path], np.float32)))
          for path, hf, _, to_hf in _hf_names(cfg, ("pooler", "kernel") in flat)}


# --- tokenizer/vocabulary agreement ---------------------------------------------------------------
def check_vocab(tokenizer, cfg: BertConfig) -> None:
  """A tokenizer larger than the embedding table maps the extra ids to [UNK] (counted), never a crash."""
  if tokenizer.vocab_size > cfg.vocab_size:
    logging.warning("tokenizer has %d pieces but the checkpoint's embedding table %d rows: ids >= %d "
                    "are mapped to [UNK] (counted in tokenizer.num_oov_ids). Is this the model's own "
                    "vocabulary?", tokenizer.vocab_size, cfg.vocab_size, cfg.vocab_size)
    tokenizer.limit_vocab(cfg.vocab_size)
  elif tokenizer.vocab_size < cfg.vocab_size:
    logging.info("tokenizer has %d pieces, the embedding table %d rows (%d unused rows)",
                 tokenizer.vocab_size, cfg.vocab_size, cfg.vocab_size - tokenizer.vocab_size)


# --- converted checkpoints (local folders or gs:// URLs) -----------------------------------------
def _guarded(url, fn):
  """fn(), with a gs:// location that cannot be reached as one line naming it (paths.access_error)."""
  try:
    return fn()
  except (FileNotFoundError, ValueError):
    raise
  except Exception as e:  # noqa: BLE001  (gcsfs/google-auth raise their own types)
    if paths.is_remote(url):
      raise paths.access_error(url, e) from e
    raise


def _checkpointer():
  import orbax.checkpoint as ocp
  # SPANLM_CHECKPOINT_OCDBT=0: one zarr store per array (spanlm/checkpoint.py says why).
  ocdbt = os.environ.get("SPANLM_CHECKPOINT_OCDBT", "1") != "0"
  return ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=ocdbt))


def _local_files(folder) -> str:
  """A local folder holding the top-level files of `folder` (itself if local; for gs://, copies
  in a temporary cache, fetched once): tokenizer files and JSON that local readers open by name."""
  if not paths.is_remote(folder):
    return str(folder)
  local = os.path.join(tempfile.gettempdir(), "spanlm_remote_files",
                       hashlib.sha256(str(folder).encode()).hexdigest()[:12])
  os.makedirs(local, exist_ok=True)
  for child in _guarded(folder, lambda: list(paths.path(folder).iterdir())):
    if not child.is_dir():
      child.copy(paths.path(os.path.join(local, child.name)), overwrite=True)
  return local


def is_converted(path) -> bool:
  paths.check_bucket(path)  # an absent bucket is an error, not "no checkpoint there"
  return _guarded(path, (paths.path(path) / META_FILE).exists)


def save_converted(out_dir, cfg: BertConfig, params: dict, tokenizer) -> str:
  """Write a converted checkpoint (overwriting one at `out_dir`, a folder or a gs:// URL)."""
  paths.check_bucket(out_dir)
  out = paths.path(out_dir)
  _guarded(out_dir, lambda: out.mkdir(parents=True, exist_ok=True))
  tok_file = os.path.basename(tokenizer.path)
  if paths.path(tokenizer.path) != out / tok_file:
    paths.path(tokenizer.path).copy(out / tok_file, overwrite=True)
  if hasattr(tokenizer, "do_lower_case"):
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": tokenizer.do_lower_case}))
  params_dir = out / "params"
  if params_dir.exists():
    params_dir.rmtree()
  with _checkpointer() as ckptr:
    ckptr.save(params_dir, {"encoder": tu.unflatten_dict(
        {k: np.asarray(v, np.float32) for k, v in tu.flatten_dict(unstack_layers(params)).items()})})
  meta = {"format_version": FORMAT_VERSION, "tokenizer": tok_file,
          **{k: getattr(cfg, k) for k in _SERIALIZED}}
  (out / META_FILE).write_text(json.dumps(meta, indent=2))  # last: marks the checkpoint complete
  return str(out)


def load_converted(path: str, tokenizer: str | None = None):
  """(BertConfig, encoder params as numpy, tokenizer) from a converted checkpoint.

  The params come in the layout of `BertEncoder(cfg)`: stacked `layers` when cfg scans its
  layers (6 or more, by default), else `layer_0 ...` as stored.
  """
  from spanlm.data import wordpiece

  paths.check_bucket(path)
  meta = json.loads(_guarded(path, (paths.path(path) / META_FILE).read_text))
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}/{META_FILE} has format_version {meta.get('format_version')}, expected "
                     f"{FORMAT_VERSION}; re-run tools/import_checkpoint.py")
  cfg = BertConfig(**{k: meta[k] for k in _SERIALIZED})
  with _checkpointer() as ckptr:
    raw = ckptr.restore(paths.path(path) / "params")
  params = tu.unflatten_dict({k: np.asarray(v) for k, v in tu.flatten_dict(raw["encoder"]).items()})
  params = to_layout(params, cfg.scanned)
  tok = wordpiece.load_tokenizer(tokenizer or os.path.join(_local_files(path), meta["tokenizer"]))
  check_vocab(tok, cfg)
  return cfg, params, tok


def import_hf(src: str, out_dir: str) -> str:
  """HF BERT directory (config.json, model.safetensors, vocab.txt) -> converted checkpoint."""
  from safetensors.numpy import load_file

  from spanlm.data import wordpiece

  paths.check_bucket(src)  # both ends reachable before any work
  paths.check_bucket(out_dir)
  src = _local_files(src)  # a gs:// source is fetched (its files: config, vocabulary, weights)
  for name in ("config.json", "vocab.txt"):
    if not os.path.isfile(os.path.join(src, name)):
      raise FileNotFoundError(f"{src!r} has no {name}; expected an HF BERT directory "
                              f"(config.json, model.safetensors, vocab.txt)")
  weights = os.path.join(src, "model.safetensors")
  if not os.path.isfile(weights):
    pickled = [f for f in ("pytorch_model.bin", "tf_model.h5") if os.path.isfile(os.path.join(src, f))]
    raise FileNotFoundError(
        f"{src!r} has no model.safetensors" + (f" (only {pickled}: pickled/other formats are not read, "
                                               f"convert them to safetensors first)" if pickled else ""))
  with open(os.path.join(src, "config.json")) as f:
    cfg = config_from_hf(json.load(f))
  tensors = load_file(weights)
  params = params_from_hf(tensors, cfg)
  rows = params["embeddings"]["word_embeddings"].shape[0]
  if rows != cfg.vocab_size:
    logging.warning("config.json says vocab_size=%d but the embedding table has %d rows; using %d",
                    cfg.vocab_size, rows, rows)
    cfg = with_overrides(cfg, vocab_size=rows)
  tok = wordpiece.load_tokenizer(os.path.join(src, "vocab.txt"))
  check_vocab(tok, cfg)
  return save_converted(out_dir, cfg, params, tok)


def export_hf(src: str, out_dir: str) -> str:
  """Converted checkpoint -> HF BERT directory (config.json, model.safetensors, vocab)."""
  from safetensors.numpy import save_file

  from safetensors.numpy import save

  paths.check_bucket(src)  # both ends reachable before any work
  paths.check_bucket(out_dir)
  cfg, params, tok = load_converted(src)
  out = paths.path(out_dir)  # a folder or a gs:// URL
  _guarded(out_dir, lambda: out.mkdir(parents=True, exist_ok=True))
  (out / "config.json").write_text(json.dumps(config_to_hf(cfg, tok.pad_id), indent=2))
  (out / "model.safetensors").write_bytes(save(params_to_hf(params, cfg), metadata={"format": "pt"}))
  if tok.path.endswith(".model"):
    logging.warning("the tokenizer is SentencePiece (%s): copied as is; HF's BertTokenizer cannot read it",
                    os.path.basename(tok.path))
    paths.path(tok.path).copy(out / os.path.basename(tok.path), overwrite=True)
  else:
    paths.path(tok.path).copy(out / "vocab.txt", overwrite=True)
    (out / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": tok.do_lower_case, "tokenizer_class": "BertTokenizer"}))
  return str(out)


# --- using a converted checkpoint ----------------------------------------------------------------
def embed_texts(cfg: BertConfig, params: dict, tokenizer, texts: list[str], max_len: int = 128,
                batch_size: int = 32, attentions: bool = False) -> tuple[dict[str, np.ndarray], dict]:
  """Encoder outputs for `texts` ([CLS] text [SEP], padded to the longest, at most max_len).

  Returns ({'input_ids', 'attention_mask', 'last_hidden_state' [N, L, H] float32,
  ('attentions' [N, layers, heads, L, L])}, report with counted truncations).
  """
  import jax
  import jax.numpy as jnp

  from spanlm.models.bert import BertEncoder

  if max_len > cfg.max_position_embeddings:
    raise ValueError(f"max_len={max_len} exceeds the model's max_position_embeddings={cfg.max_position_embeddings}")
  encoded = [tokenizer.encode(t) for t in texts]
  truncated = sum(len(e) > max_len - 2 for e in encoded)
  if truncated:
    logging.warning("%d of %d texts longer than %d tokens were truncated", truncated, len(texts), max_len)
  rows = [[tokenizer.cls_id] + e[:max_len - 2] + [tokenizer.sep_id] for e in encoded]
  length = max((len(r) for r in rows), default=2)
  ids = np.full((len(rows), length), tokenizer.pad_id, np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  mask = (np.arange(length)[None] < np.array([len(r) for r in rows])[:, None]).astype(np.int32)
  model = BertEncoder(dataclasses.replace(cfg, use_pooler=False, dropout_rate=0.0))
  encoder_params = to_layout({k: v for k, v in params.items() if k != "pooler"}, model.cfg.scanned)

  @jax.jit
  def forward(p, i, m):
    if attentions:
      x, sown = model.apply({"params": p}, i, attention_mask=m, mutable=["attentions"])
      if cfg.share_layers == "none":
        sown = unstack_layers(sown["attentions"])
        probs = [sown[f"layer_{j}"]["attention"]["probs"][0] for j in range(cfg.num_layers)]
      else:  # one module: its sown tuple holds one entry per layer (stacked when scanned)
        probs = [p for leaf in jax.tree.leaves(sown["attentions"]["layer_shared"]["attention"]["probs"])
                 for p in (leaf if leaf.ndim == 5 else [leaf])]
      return x, jnp.stack(probs, axis=1)
    return model.apply({"params": p}, i, attention_mask=m), None

  hidden, maps = [], []
  for s in range(0, len(rows), batch_size):
    x, a = forward(encoder_params, ids[s:s + batch_size], mask[s:s + batch_size])
    hidden.append(np.asarray(x, np.float32))
    if attentions:
      maps.append(np.asarray(a, np.float32))
  out = {"input_ids": ids, "attention_mask": mask,
         "last_hidden_state": np.concatenate(hidden) if hidden else np.zeros((0, length, cfg.hidden_size), np.float32)}
  if attentions:
    out["attentions"] = np.concatenate(maps) if maps else np.zeros(
        (0, cfg.num_layers, cfg.num_heads, length, length), np.float32)
  return out, {"texts": len(texts), "truncated": truncated, "length": length,
               "unk_out_of_vocab_ids": tokenizer.num_oov_ids}
