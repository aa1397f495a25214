"""Parameter counts and training FLOPs of a pretraining model, without initialising it.

Parameters come from `jax.eval_shape` of the objective's `init_params` (shapes
only, no memory), grouped by top-level module. Counted as the papers count them
(Devlin et al. 2019 "BERT-base 110M"; Lan et al. 2020 Table 1; Clark et al.
2020 Table 1): the encoder = embeddings + layers + pooler, without the
pretraining heads; `embedding` = the embedding tables, their LayerNorm and
ALBERT's E->H projection; `non_embedding` = the rest of the encoder.

FLOPs per token (Kaplan et al. 2020, §2.1; a multiply-add = 2 FLOPs), forward:

  C_fwd = 2 · N_applied  +  n_layer · 4 · L · H  (+ heads)

N_applied = the matmul weights a token goes through (per layer: 4·H² + 2·H·I,
times n_layer even when ALBERT shares them; plus E·H for ALBERT's
projection); 4·L·H per layer is attention's QK^T and AV (2·L·H each, L the
sequence length). The MLM head runs only at the P = ceil(rate·L) predicted
positions: (P/L) · 2 · (H·E + E·V) per token. Embedding lookups, LayerNorms,
biases and softmaxes are not counted. Training = 3 · C_fwd (the backward pass
costs twice the forward).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import linen as nn

ENCODER_PARTS = ("embeddings", "pooler")


def _size(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract_params(config, vocab_size: int):
  """Param shapes of `config`'s pretraining model (no initialisation)."""
  from spanlm.objectives import base as pretraining
  objective = pretraining.make_objective(config, vocab_size, np.zeros(vocab_size, bool))
  boxed = jax.eval_shape(objective.init_params, jax.random.PRNGKey(0))
  return objective, nn.meta.unbox(boxed)


def _encoder_tree(params):
  """The encoder's params of a pretraining model (ELECTRA: the discriminator's)."""
  if "encoder" in params:
    return params["encoder"]
  for key in ("discriminator", "student"):
    if key in params:
      return _encoder_tree(params[key])
  raise ValueError(f"no encoder in the parameter tree (top-level keys {sorted(params)})")


def summarize(config, vocab_size: int) -> dict:
  """Parameter counts, training FLOPs per token and a per-module table, as a JSON-able dict."""
  objective, params = abstract_params(config, vocab_size)
  cfg = objective.model.cfg if hasattr(objective.model, "cfg") else None
  encoder = _encoder_tree(params)
  embedding = _size(encoder["embeddings"])
  encoder_total = _size(encoder)
  total = _size(params)
  L = int(config.train.seq_len)
  table = []
  for name, sub in params.items():
    if isinstance(sub, dict) and name == "encoder":
      for inner, tree in sub.items():
        table.append({"module": f"encoder/{inner}", "params": _size(tree),
                      "shapes": {jax.tree_util.keystr(p): list(x.shape)
                                 for p, x in jax.tree_util.tree_leaves_with_path(tree)}})
    else:
      table.append({"module": name, "params": _size(sub)})
  out = {"config": {"size": config.model.size, "objective": config.objective.name,
                    "vocab_size": vocab_size, "seq_len": L},
         "parameters": {"total": total, "encoder": encoder_total, "embedding": embedding,
                        "non_embedding": encoder_total - embedding, "heads": total - encoder_total},
         "layers": table}
  if cfg is not None:
    out["flops"] = flops_per_token(cfg, L, masking_rate=float(config.masking.rate))
  return out


def flops_per_token(cfg, seq_len: int, masking_rate: float = 0.15) -> dict:
  """Forward/training FLOPs per token of encoder + MLM head (see the module docstring)."""
  H, I, E, V, n = cfg.hidden_size, cfg.intermediate_size, cfg.embed_dim, cfg.vocab_size, cfg.num_layers
  per_layer_matmul = 4 * H * H + 2 * H * I
  projection = E * H if E != H else 0
  encoder_matmul = 2 * (n * per_layer_matmul + projection)
  attention = n * 4 * seq_len * H
  predicted = math.ceil(masking_rate * seq_len) / seq_len
  mlm_head = predicted * 2 * (H * E + E * V)
  forward = encoder_matmul + attention + mlm_head
  return {"forward": forward, "train": 3 * forward, "encoder_matmul_forward": encoder_matmul,
          "attention_forward": attention, "mlm_head_forward": mlm_head}
