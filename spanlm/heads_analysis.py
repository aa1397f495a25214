"""What attention heads look at: Kovaleva et al. 2019, "Revealing the Dark Secrets of BERT".

Kovaleva et al. sort self-attention maps into five patterns (§3, Fig. 1):
vertical (attention to [CLS]/[SEP]), diagonal (to the previous/next token),
vertical+diagonal, block (within the query's own segment/sentence) and
heterogeneous (none of these). The paper trained a CNN on ~400 hand-labelled
maps; we use rule-based features instead, each an average attention mass over
the n real tokens of a sequence (A is the n x n map, rows sum to 1):

  V  = (1/n) sum_i sum_{j special} A_ij                  mass on [CLS]/[SEP]
  D  = (1/n) sum_i sum_{|j-i|<=1} A_ij                   mass on itself and its neighbours
  Bm = (1/n) sum_i sum_{j: seg(j)=seg(i)} A_ij           mass inside the own segment
  Bx = (Bm - c) / (1 - c),  c = Bm of uniform attention  ... beyond chance (0 = uniform, 1 = all)

(the paper names the previous/next token; we count the token itself too, since a map along the
main diagonal is the same stripe in its Fig. 1), and these thresholds (checked in this order; the first that holds wins):

  vertical+diagonal   V >= 0.25 and D >= 0.25 and V + D >= 0.6
  vertical            V >= 0.5
  diagonal            D >= 0.5
  block               Bx >= 0.6 (needs two segments)
  heterogeneous       otherwise

A head's label is the majority over the examples. Head masking (disabling
heads) lives in `spanlm.models.bert` (`BertConfig.head_mask`).
"""

from __future__ import annotations

import collections
import json

import numpy as np

PATTERNS = ("vertical", "diagonal", "vertical+diagonal", "block", "heterogeneous")
THRESHOLDS = {"vd_each": 0.25, "vd_sum": 0.6, "vertical": 0.5, "diagonal": 0.5, "block_excess": 0.6}


def map_features(a: np.ndarray, special: np.ndarray, blocks: np.ndarray) -> dict[str, float]:
  """V, D, Bm, Bx (module docstring) of one map `a` [n, n] over real tokens only."""
  a = np.asarray(a, np.float64)
  n = len(a)
  i = np.arange(n - 1)
  same = np.asarray(blocks)[:, None] == np.asarray(blocks)[None, :]
  block = float((a * same).sum(1).mean())
  chance = float(same.mean(1).mean())
  return {
      "vertical": float(a[:, np.asarray(special, bool)].sum(1).mean()),
      "diagonal": float((a[i + 1, i].sum() + a[i, i + 1].sum() + np.trace(a)) / n),
      "block": block,
      "block_excess": (block - chance) / (1 - chance) if chance < 1 else 0.0,
  }


def classify_features(f: dict[str, float]) -> str:
  t = THRESHOLDS
  if f["vertical"] >= t["vd_each"] and f["diagonal"] >= t["vd_each"] and \
      f["vertical"] + f["diagonal"] >= t["vd_sum"]:
    return "vertical+diagonal"
  if f["vertical"] >= t["vertical"]:
    return "vertical"
  if f["diagonal"] >= t["diagonal"]:
    return "diagonal"
  if f["block_excess"] >= t["block_excess"]:
    return "block"
  return "heterogeneous"


def classify_map(a, special, blocks) -> tuple[str, dict[str, float]]:
  f = map_features(a, special, blocks)
  return classify_features(f), f


def classify_heads(probs: np.ndarray, special: np.ndarray, blocks: np.ndarray, lengths: np.ndarray) -> dict:
  """probs [layers, N, heads, T, T]; special/blocks [N, T]; lengths [N] real tokens per example.

  Returns {'labels': [layers][heads] majority pattern, 'counts': per head {pattern: n},
  'features': [layers][heads] mean features}.
  """
  num_layers, num_examples, num_heads = probs.shape[:3]
  labels, counts, features = [], [], []
  for layer in range(num_layers):
    labels.append([]), counts.append([]), features.append([])
    for head in range(num_heads):
      votes, feats = collections.Counter(), []
      for e in range(num_examples):
        n = int(lengths[e])
        label, f = classify_map(probs[layer, e, head, :n, :n], special[e, :n], blocks[e, :n])
        votes[label] += 1
        feats.append(f)
      labels[-1].append(max(PATTERNS, key=lambda p: (votes[p], -PATTERNS.index(p))))
      counts[-1].append({p: votes[p] for p in PATTERNS if votes[p]})
      features[-1].append({k: float(np.mean([f[k] for f in feats])) for k in feats[0]})
  return {"labels": labels, "counts": counts, "features": features}


def attention_probs(cfg, params, input_ids, segment_ids, attention_mask) -> np.ndarray:
  """[layers, N, heads, T, T] attention probabilities of a BertEncoder (one jitted forward)."""
  import jax

  from spanlm.models.bert import BertEncoder, to_layout, unstack_layers

  if cfg.share_layers != "none":
    raise NotImplementedError("attention maps of ALBERT-shared layers are not collected per layer")
  params = to_layout(params, cfg.scanned)  # either stored layout, the model's own

  @jax.jit
  def forward(ids, seg, mask):
    _, sown = BertEncoder(cfg).apply({"params": params}, ids, seg, mask, mutable=["attentions"])
    sown = unstack_layers(sown["attentions"])  # scanned: [layers, ...] -> per layer
    return [sown[f"layer_{j}"]["attention"]["probs"][0] for j in range(cfg.num_layers)]

  return np.stack(jax.device_get(forward(input_ids, segment_ids, attention_mask)))


def sentence_pairs(tokenizer, texts: list[str], max_len: int, num: int):
  """[CLS] A [SEP] B [SEP] from consecutive sentences: ids, segments, mask, special, lengths [N]."""
  import re

  sentences = [s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+", " ".join(t.split()))
               if len(s.split()) >= 4]
  rows = []
  for a, b in zip(sentences[::2], sentences[1::2]):
    ea, eb = tokenizer.encode(a), tokenizer.encode(b)
    if 6 <= len(ea) + len(eb) <= max_len - 3 and min(len(ea), len(eb)) >= 3:
      rows.append((ea, eb))
    if len(rows) == num:
      break
  if not rows:
    raise ValueError(f"no sentence pairs of at most {max_len} tokens in the text; give longer text "
                     f"or raise --max_len")
  ids = np.full((len(rows), max_len), tokenizer.pad_id, np.int32)
  seg = np.zeros_like(ids)
  lengths = np.zeros(len(rows), np.int32)
  for r, (ea, eb) in enumerate(rows):
    row = [tokenizer.cls_id, *ea, tokenizer.sep_id, *eb, tokenizer.sep_id]
    ids[r, :len(row)] = row
    seg[r, len(ea) + 2:len(row)] = 1
    lengths[r] = len(row)
  mask = np.arange(max_len)[None, :] < lengths[:, None]
  special = np.isin(ids, (tokenizer.cls_id, tokenizer.sep_id)) & mask
  return ids, seg, mask, special, lengths


def write_report(result: dict, probs: np.ndarray, special, lengths, out_dir: str, title: str = "") -> dict:
  """heads.json, heads.md (layer x head table) and attention_maps.png (example 0's maps)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from spanlm import paths
  out = paths.path(out_dir)  # a local folder or a gs:// URL
  out.mkdir(parents=True, exist_ok=True)
  labels = result["labels"]
  num_layers, num_heads = len(labels), len(labels[0])
  totals = collections.Counter(l for row in labels for l in row)
  summary = {"title": title, "thresholds": THRESHOLDS, "patterns": PATTERNS,
             "share": {p: totals[p] / (num_layers * num_heads) for p in PATTERNS}, **result}
  (out / "heads.json").write_text(json.dumps(summary, indent=1))
  short = {"vertical": "V", "diagonal": "D", "vertical+diagonal": "V+D", "block": "B", "heterogeneous": "H"}
  lines = [f"# Attention patterns{': ' + title if title else ''}", "",
           "V vertical, D diagonal, V+D vertical+diagonal, B block, H heterogeneous "
           "(rule-based, spanlm/heads_analysis.py)", "",
           "| layer | " + " | ".join(f"h{h}" for h in range(num_heads)) + " |",
           "|---|" + "---|" * num_heads]
  lines += [f"| {l} | " + " | ".join(short[x] for x in row) + " |" for l, row in enumerate(labels)]
  lines += ["", "Share of heads: " + ", ".join(f"{p} {summary['share'][p]:.0%}" for p in PATTERNS)]
  (out / "heads.md").write_text("\n".join(lines) + "\n")
  n = int(lengths[0])
  fig, axes = plt.subplots(num_layers, num_heads, figsize=(1.6 * num_heads, 1.6 * num_layers), squeeze=False)
  for l in range(num_layers):
    for h in range(num_heads):
      ax = axes[l][h]
      ax.imshow(probs[l, 0, h, :n, :n], cmap="viridis", vmin=0, vmax=1)
      ax.set_title(f"L{l}H{h} {short[labels[l][h]]}", fontsize=7)
      ax.set_xticks([]), ax.set_yticks([])
  fig.suptitle(title or "attention maps (example 0)", fontsize=9)
  fig.tight_layout()
  paths.write_figure(fig, out / "attention_maps.png", dpi=90)
  return summary


# --- head ablation (Michel et al. 2019, "Are Sixteen Heads Really Better than One?") -------------
def without_head(encoder_params: dict, layer: int, head: int) -> dict:
  """Encoder params in which (layer, head) contributes nothing: its rows of the attention output
  projection W_O [heads, head_dim, hidden] are zero. Equal to BertConfig.head_mask=('layer:head',)
  (tests/test_heads.py), but one compiled model then serves every ablation. Either layout
  (scanned `layers` [n, heads, head_dim, hidden] or unrolled `layer_i`)."""
  import copy
  out = copy.copy(encoder_params)
  if "layers" in out:  # scanned: the same rows of the stacked kernel's slice `layer`
    stack = out["layers"] = copy.copy(out["layers"])
    attn = stack["attention"] = copy.copy(stack["attention"])
    proj = attn["output"] = copy.copy(attn["output"])
    kernel = np.array(proj["kernel"])
    kernel[layer, head] = 0.0
    proj["kernel"] = kernel
    return out
  layer_p = out[f"layer_{layer}"] = copy.copy(out[f"layer_{layer}"])
  attn = layer_p["attention"] = copy.copy(layer_p["attention"])
  proj = attn["output"] = copy.copy(attn["output"])
  kernel = np.array(proj["kernel"])
  kernel[head] = 0.0
  proj["kernel"] = kernel
  return out


def ablate(score_fn, params: dict, num_layers: int, num_heads: int, encoder_key: str = "encoder") -> dict:
  """score_fn(params) -> float for the full model and with each head disabled in turn.

  Returns {'base': s, 'scores': [layers][heads], 'delta': [layers][heads] (ablated - base)}.
  """
  base = float(score_fn(params))
  scores = np.zeros((num_layers, num_heads))
  for layer in range(num_layers):
    for head in range(num_heads):
      ablated = {**params, encoder_key: without_head(params[encoder_key], layer, head)}
      scores[layer, head] = float(score_fn(ablated))
  return {"base": base, "scores": scores.tolist(), "delta": (scores - base).tolist()}


def plot_ablation(result: dict, metric: str, path: str, title: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  delta = np.asarray(result["delta"])
  lim = max(float(np.abs(delta).max()), 1e-6)
  fig, ax = plt.subplots(figsize=(0.5 * delta.shape[1] + 2, 0.45 * delta.shape[0] + 1.5))
  im = ax.imshow(delta, cmap="RdBu", vmin=-lim, vmax=lim)
  ax.set_xlabel("head"), ax.set_ylabel("layer")
  ax.set_xticks(range(delta.shape[1])), ax.set_yticks(range(delta.shape[0]))
  fig.colorbar(im, ax=ax, label=f"{metric} change (base {result['base']:.4f})")
  ax.set_title(title or f"{metric} change with one head disabled", fontsize=9)
  fig.tight_layout()
  from spanlm import paths
  paths.write_figure(fig, path, dpi=90)
