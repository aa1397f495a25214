"""BERTSUM extractive summarisation (Liu & Lapata 2019, "Text Summarization with
Pretrained Encoders", §3.2-3.4, §4).

Input: every sentence gets its own [CLS] and [SEP],

  [CLS] s1 [SEP] [CLS] s2 [SEP] [CLS] s3 [SEP] ...

with interval segment ids (0 for s1, 1 for s2, 0 for s3, ...). The encoder's
vector at each [CLS] represents its sentence, t_i. Two inter-sentence
Transformer layers (pre-LN, as in the paper's code) run over the sentence
vectors plus sinusoidal positions PE(i):

  h^0 = t + PE,  h̃^l = h^{l-1} + MHAtt(LN(h^{l-1})),  h^l = h̃^l + FFN(LN(h̃^l))
  ŷ_i = σ(W_o LN(h_i^L) + b_o)

(no LN before the first layer's attention, as in the paper's implementation)
trained with binary cross-entropy against oracle labels, summed over a
document's sentences. Preprocessing follows PreSumm's `format_to_bert`
(nlpyang/PreSumm src/prepro/data_builder.py): the greedy ROUGE-1+2 oracle (up to
3 sentences, `spanlm.tasks.rouge.greedy_oracle`, PreSumm's cleaning and n-gram
sets) is computed on the first 100 sentences of the whole document, *before*
sentences of at most `min_sentence_tokens` (5) tokens are dropped; training
documents left with fewer than 3 sentences are skipped (counted). Inference
(PreSumm's `trainer_ext.test`): the top-3 sentences by ŷ, skipping any that
shares a trigram with those already chosen (trigram blocking), written in score
order (`bertsum.document_order=True` sorts them). Reported ROUGE-1/2/Lsum come
from the `rouge-score` package (stemmed).

Optimisation (§3.4): the paper trains the pretrained encoder and the new
layers with separate Adams (β1 = 0.9, β2 = 0.999) and Noam schedules,

  lr_enc(step) = 2e-3 · min(step^-0.5, step · 20000^-1.5)
  lr_new(step) = 0.1  · min(step^-0.5, step · 10000^-1.5)

(stated for the abstractive model, whose decoder is new; the extractive model
used one schedule, 2e-3 with 10000 warmup steps). Here they are split between
params['encoder'] and everything else: one Adam per group, each with its own
Noam schedule (`scale_by_group_schedules`; equal to `optax.multi_transform`
of two Adams, which the tests check).

Data: BertSum's JSON layout, a list of {"src": [[token, ...], ...] (sentences),
"tgt": [[token, ...], ...] (summary sentences)}; or raw text
{"article"|"text": str, "highlights"|"summary"|"abstract": str} split into
sentences by the rule-based `split_sentences`; or JSON lines of either.
Malformed rows, empty documents and truncated documents are counted and logged.
"""

from __future__ import annotations

import collections
import json
import re
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spanlm import paths
from spanlm.models.bert import BertConfig, BertEncoder, SelfAttention, dense, layer_norm
from spanlm.tasks import rouge
from spanlm.tasks.base import Features, Task, masked_sum

ORACLE_SOURCE_SENTENCES = 100  # PreSumm's max_src_nsents: the oracle sees the first 100 sentences
MIN_TRAIN_SENTENCES = 3  # PreSumm's min_src_nsents: shorter training documents are skipped

# --- sentences ---------------------------------------------------------------------------

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc inc ltd co corp gen col lt sgt capt gov sen rep rev "
    "jan feb mar apr jun jul aug sep sept oct nov dec no fig approx dept est".split())
_BOUNDARY = re.compile(r"([.!?]+[\"'”’)\]]*)\s+(?=[\"'“‘(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
  """Rule-based sentence splitter.

  A boundary is [.!?] (plus closing quotes/brackets) then whitespace then an
  upper-case letter or digit, unless the word before the period is a known
  abbreviation ("Mr.", "Dr.", "Jan."), a single letter ("J. Smith", "U.S.")
  or the period sits between initials. Newlines that separate paragraphs
  (blank lines) always end a sentence.
  """
  out = []
  for para in re.split(r"\n\s*\n", text):
    para = " ".join(para.split())
    start = 0
    for m in _BOUNDARY.finditer(para):
      before = para[start:m.start()].split()
      last = before[-1].rstrip(".").lower() if before else ""
      if m.group(1).startswith(".") and (last in _ABBREVIATIONS or len(last.replace(".", "")) <= 1
                                          or "." in last):
        continue
      out.append(para[start:m.end(1)])
      start = m.end()
    if para[start:].strip():
      out.append(para[start:])
  return [s.strip() for s in out if s.strip()]


# --- documents ---------------------------------------------------------------------------

def _as_sentences(value) -> list[list[str]] | None:
  """A document field as a list of token lists: pre-split token lists, or raw text to split."""
  if isinstance(value, str):
    return [s.split() for s in split_sentences(value)]
  if isinstance(value, list) and all(isinstance(s, list) and all(isinstance(t, str) for t in s)
                                     for s in value):
    return [s for s in value if s]
  if isinstance(value, list) and all(isinstance(s, str) for s in value):
    return [s.split() for s in value if s.strip()]
  return None


def parse_document(row) -> tuple[list[list[str]], list[list[str]]] | None:
  """(source sentences, summary sentences) of one row, or None if the row is malformed."""
  if not isinstance(row, dict):
    return None
  src = next((row[k] for k in ("src", "article", "text", "document") if k in row), None)
  tgt = next((row[k] for k in ("tgt", "highlights", "summary", "abstract") if k in row), None)
  src, tgt = _as_sentences(src), _as_sentences(tgt)
  if src is None or tgt is None:
    return None
  return src, tgt


def load_documents(pattern: str, report: collections.Counter | None = None):
  """Documents from a JSON list file, JSON lines file or a glob of them (local or gs://); bad rows
  counted."""
  report = report if report is not None else collections.Counter()
  files = paths.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]
  if not files or not all(paths.is_file(p) for p in files):
    raise FileNotFoundError(f"no summarisation data at {pattern!r}; set config.data.train_file / "
                            f"eval_file to a BertSum JSON file or glob (e.g. cnndm.train.*.json)")
  docs = []
  for path in files:
    text = paths.read_text(path)
    try:
      rows = json.loads(text)
      if isinstance(rows, dict):
        rows = [rows]
    except json.JSONDecodeError:
      rows = []
      for line in text.splitlines():  # JSON lines: a bad line is one malformed row
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError:
            report["skipped_malformed_rows"] += 1
    if not isinstance(rows, list):
      raise ValueError(f"{path}: expected a JSON list of documents or JSON lines")
    for row in rows:
      doc = parse_document(row)
      if doc is None:
        report["skipped_malformed_rows"] += 1
      elif not doc[0] or not doc[1]:
        report["skipped_empty_documents"] += 1
      else:
        docs.append(doc)
  report["documents"] += len(docs)
  return docs


# --- features ----------------------------------------------------------------------------

def featurize(docs, tokenizer, seq_len: int, max_sentences: int, max_sentence_tokens: int = 200,
              oracle_sentences: int = 3, min_sentence_tokens: int = 5, training: bool = False,
              report: collections.Counter | None = None) -> Features:
  """One row per document: [CLS] s [SEP] per sentence, interval segments, [CLS] positions, labels.

  As PreSumm: the oracle is computed on the document's first 100 sentences, then
  sentences of at most `min_sentence_tokens` tokens are dropped (Daily Mail bylines
  "by", "published :"; counted as `dropped_short_sentences`) and the oracle's labels
  follow the sentences kept; in training, documents left with fewer than 3
  sentences are skipped (`skipped_short_documents`). Whole sentences are then packed
  while they fit in `seq_len` and `max_sentences`; the rest of a longer document is
  dropped and counted (`truncated_documents`, `dropped_sentences`).
  """
  report = report if report is not None else collections.Counter()
  cls_id, sep_id, pad_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
  rows = collections.defaultdict(list)
  meta = []
  for full_src, tgt in docs:
    oracle_all = rouge.greedy_oracle(full_src[:ORACLE_SOURCE_SENTENCES], tgt, oracle_sentences)
    keep = [i for i, s in enumerate(full_src) if len(s) > min_sentence_tokens]
    report["dropped_short_sentences"] += len(full_src) - len(keep)
    if training and len(keep) < MIN_TRAIN_SENTENCES:
      report["skipped_short_documents"] += 1
      continue
    src = [full_src[i] for i in keep]
    oracle = [n for n, i in enumerate(keep) if i in oracle_all]  # indices into `src`
    ids, segs, cls_pos, kept = [], [], [], []
    for i, sent in enumerate(src):
      pieces = tokenizer.encode(" ".join(sent))
      if not pieces:
        report["skipped_empty_sentences"] += 1
        continue
      if len(pieces) > max_sentence_tokens:
        report["truncated_sentences"] += 1
        pieces = pieces[:max_sentence_tokens]
      if not kept and len(pieces) + 2 > seq_len:  # a first sentence longer than the row
        report["truncated_sentences"] += 1
        pieces = pieces[:seq_len - 2]
      if len(ids) + len(pieces) + 2 > seq_len or len(kept) == max_sentences:
        report["truncated_documents"] += 1
        report["dropped_sentences"] += len(src) - i
        break
      cls_pos.append(len(ids))
      ids += [cls_id, *pieces, sep_id]
      segs += [len(kept) % 2] * (len(pieces) + 2)
      kept.append(i)
    if not kept:
      report["skipped_empty_documents"] += 1
      continue
    pad, spad = seq_len - len(ids), max_sentences - len(kept)
    rows["input_ids"].append(ids + [pad_id] * pad)
    rows["segment_ids"].append(segs + [0] * pad)
    rows["attention_mask"].append([1] * len(ids) + [0] * pad)
    rows["cls_positions"].append(cls_pos + [0] * spad)
    rows["sentence_mask"].append([1] * len(kept) + [0] * spad)
    rows["labels"].append([float(i in oracle) for i in kept] + [0.0] * spad)
    meta.append({"sentences": [src[i] for i in kept], "all_sentences": src, "oracle": oracle,
                 "oracle_all": [full_src[i] for i in oracle_all],
                 "reference": [" ".join(s) for s in tgt]})
  if not meta:
    raise ValueError("no BERTSUM rows: every document was skipped ("
                     + ", ".join(f"{k}={v}" for k, v in sorted(report.items())) + ")")
  arrays = {k: np.asarray(v, np.float32 if k == "labels" else np.int32) for k, v in rows.items()}
  report["rows"] = len(meta)
  return Features(arrays, meta, dict(report))


# --- model -------------------------------------------------------------------------------

def sinusoidal_positions(n: int, dim: int) -> np.ndarray:
  """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...) (Vaswani et al. 2017)."""
  pos = np.arange(n)[:, None]
  rate = np.exp(-np.log(10000.0) * (np.arange(0, dim, 2) / dim))
  pe = np.zeros((n, dim), np.float32)
  pe[:, 0::2] = np.sin(pos * rate)
  pe[:, 1::2] = np.cos(pos * rate)[:, :dim // 2]
  return pe


class InterSentenceLayer(nn.Module):
  """Pre-LN Transformer layer over sentence vectors (LN skipped before the first layer's attention)."""

  cfg: BertConfig
  first: bool

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    cfg = self.cfg
    h = x if self.first else layer_norm(cfg, "attention_norm")(x)
    x = x + nn.Dropout(cfg.dropout_rate)(SelfAttention(cfg, name="attention")(h, mask, deterministic),
                                         deterministic=deterministic)
    h = layer_norm(cfg, "ffn_norm")(x)
    h = nn.gelu(dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(h), approximate=False)
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h)
    return x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)


class BertSumExt(nn.Module):
  """Encoder -> [CLS] vectors -> inter-sentence layers -> one logit per sentence."""

  cfg: BertConfig
  inter_layers: int = 2

  @nn.compact
  def __call__(self, batch, deterministic: bool = True):
    cfg = self.cfg
    hidden = BertEncoder(cfg, name="encoder")(batch["input_ids"], batch["segment_ids"],
                                              batch["attention_mask"], deterministic=deterministic)
    if isinstance(hidden, tuple):
      hidden = hidden[0]
    mask = batch["sentence_mask"].astype(bool)
    sents = jnp.take_along_axis(hidden, batch["cls_positions"][..., None], axis=1)
    x = sents * mask[..., None] + sinusoidal_positions(mask.shape[1], cfg.hidden_size).astype(sents.dtype)
    attn_mask = mask[:, None, None, :]
    for i in range(self.inter_layers):
      x = InterSentenceLayer(cfg, first=i == 0, name=f"inter_layer_{i}")(x, attn_mask, deterministic)
    x = layer_norm(cfg, "inter_norm")(x)
    logits = dense(cfg, 1, ("embed", "classes"), "scorer")(x)[..., 0].astype(jnp.float32)
    return {"logits": jnp.where(mask, logits, -1e9)}


def sentence_bce(outputs, batch):
  """Per document: Σ_i BCE(σ(logit_i), y_i) over its real sentences."""
  mask = batch["sentence_mask"].astype(jnp.float32)
  losses = optax.sigmoid_binary_cross_entropy(outputs["logits"], batch["labels"])
  return jnp.sum(losses * mask, axis=-1)


# --- optimisation ------------------------------------------------------------------------

def noam_schedule(scale: float, warmup_steps: int) -> optax.Schedule:
  """lr(step) = scale · min(step^-0.5, step · warmup^-1.5), step counted from 1 (Vaswani et al. 2017)."""
  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    return scale * jnp.minimum(step ** -0.5, step * float(warmup_steps) ** -1.5)
  return schedule


def param_groups(params):
  """'encoder' for the pretrained encoder's parameters, 'new' for everything else."""
  return {k: jax.tree.map(lambda _: "encoder" if k == "encoder" else "new", v) for k, v in params.items()}


class GroupScheduleState(NamedTuple):
  count: jax.Array


def scale_by_group_schedules(schedules: dict[str, optax.Schedule], labels) -> optax.GradientTransformation:
  """updates ← -schedules[labels(updates)[leaf]](count) · updates, leaf by leaf.

  Adam's moments are per parameter, so `chain(scale_by_adam(b1, b2), this)`
  is exactly one Adam per group with its own schedule (what
  `optax.multi_transform` of two Adams computes when they share b1, b2, eps).
  Its state is a step count only, so unlike multi_transform's masked states it
  can be built from the parameter placeholder of `optax.tree_map_params`,
  which the fine-tuning loop uses to shard optimizer states.
  """
  def init(params):
    del params
    return GroupScheduleState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    lrs = {g: s(state.count) for g, s in schedules.items()}
    updates = jax.tree.map(lambda u, g: -lrs[g] * u, updates, labels(updates))
    return updates, GroupScheduleState(optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init, update)


def make_optimizer(encoder_lr: float, encoder_warmup: int, new_lr: float, new_warmup: int,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, grad_clip: float = 0.0):
  """Separate Adams with Noam schedules for the encoder and the new layers (§3.4)."""
  tx = optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      scale_by_group_schedules({"encoder": noam_schedule(encoder_lr, encoder_warmup),
                                "new": noam_schedule(new_lr, new_warmup)}, param_groups))
  if grad_clip and grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  return tx


# --- the task ----------------------------------------------------------------------------

def extend_config(c) -> None:
  """Declare config.bertsum (and the data files) on a fine-tuning config: the one place they are set."""
  import ml_collections

  with c.unlocked():
    c.data.train_file = ""  # BertSum JSON (list of {src, tgt}) file or glob; raw {article, highlights} too
    c.data.eval_file = ""  # the same for evaluation
    c.bertsum = ml_collections.ConfigDict()
    c.bertsum.inter_layers = 2  # inter-sentence Transformer layers over the [CLS] vectors
    c.bertsum.max_sentences = 64  # sentence slots per document (longer documents truncated, counted)
    c.bertsum.max_sentence_tokens = 200  # sub-tokens kept per sentence
    c.bertsum.min_sentence_tokens = 5  # sentences of at most this many tokens dropped, counted (PreSumm)
    c.bertsum.oracle_sentences = 3  # greedy ROUGE oracle size (labels)
    c.bertsum.select_sentences = 3  # sentences in a predicted summary
    c.bertsum.trigram_blocking = True  # skip sentences sharing a trigram with the summary so far
    c.bertsum.document_order = False  # write the summary in document order (PreSumm: score order)
    c.bertsum.separate_optimizers = True  # encoder and new layers: separate Adams + Noam schedules
    c.bertsum.encoder_lr = 2e-3  # Noam scale for the encoder
    c.bertsum.encoder_warmup = 20000  # Noam warmup steps for the encoder
    c.bertsum.new_lr = 0.1  # Noam scale for the inter-sentence layers and scorer
    c.bertsum.new_warmup = 10000  # Noam warmup steps for the new layers


def validate_config(config) -> None:
  b = config.bertsum
  for key in ("inter_layers", "max_sentences", "max_sentence_tokens", "oracle_sentences", "select_sentences",
              "encoder_warmup", "new_warmup"):
    if not isinstance(b[key], int) or b[key] <= 0:
      raise ValueError(f"invalid config: config.bertsum.{key}={b[key]!r} must be a positive integer")
  if not isinstance(b.min_sentence_tokens, int) or b.min_sentence_tokens < 0:
    raise ValueError(f"invalid config: config.bertsum.min_sentence_tokens={b.min_sentence_tokens!r} must be "
                     f"a non-negative integer")


class BertSumTask(Task):
  """Extractive summarisation for `spanlm.finetune`; files from config.data.train_file / eval_file."""

  name = "bertsum"
  metric = "rouge_mean"  # mean of ROUGE-1/2/L F1 of the model's summaries
  splits = ("train", "dev")

  def __init__(self, config):
    super().__init__(config)
    self.hp = config.bertsum

  def load(self, split: str, tokenizer, seq_len: int) -> Features:
    if split not in self.splits:
      raise ValueError(f"BERTSUM has splits {self.splits}, not {split!r}")
    key = "train_file" if split == "train" else "eval_file"
    pattern = self.config.data[key]
    if not pattern:
      raise ValueError(f"config.data.{key} is empty: give a BertSum JSON file or glob")
    report = collections.Counter()
    docs = load_documents(pattern, report)
    return featurize(docs, tokenizer, seq_len, self.hp["max_sentences"], self.hp["max_sentence_tokens"],
                     self.hp["oracle_sentences"], self.hp["min_sentence_tokens"], training=split == "train",
                     report=report)

  def build_model(self, encoder_cfg: BertConfig) -> nn.Module:
    return BertSumExt(encoder_cfg, inter_layers=int(self.hp["inter_layers"]))

  def loss(self, outputs, batch):
    return masked_sum(sentence_bce(outputs, batch), batch)

  def predict(self, outputs, features):
    logits = np.asarray(outputs["logits"])
    preds = []
    for row, m in enumerate(features.meta[:len(logits)]):
      n = len(m["sentences"])
      chosen = rouge.select_with_trigram_blocking(m["sentences"], logits[row, :n],
                                                  int(self.hp["select_sentences"]),
                                                  bool(self.hp["trigram_blocking"]),
                                                  bool(self.hp["document_order"]))
      preds.append({"selected": chosen, "summary": [" ".join(m["sentences"][i]) for i in chosen]})
    return preds

  def evaluate(self, predictions, features, calibration=None) -> dict[str, float]:
    """Mean ROUGE-1/2/Lsum F1 (×100, rouge-score) of the model, and of the oracle and lead-3 for reference."""
    k = int(self.hp["select_sentences"])
    keys = ("rouge_1", "rouge_2", "rouge_lsum")
    systems = collections.defaultdict(list)
    for p, m in zip(predictions, features.meta):
      ref = m["reference"]
      systems[""].append(rouge.rouge(p["summary"], ref))
      systems["oracle_"].append(rouge.rouge([" ".join(s) for s in m["oracle_all"]], ref))
      systems["lead3_"].append(rouge.rouge([" ".join(s) for s in m["all_sentences"][:k]], ref))
    out = {}
    for prefix, scores in systems.items():
      for key in keys:
        out[prefix + key] = 100.0 * float(np.mean([s[key] for s in scores]))
      out[prefix + "rouge_mean"] = float(np.mean([out[prefix + k] for k in keys]))
    return out

  def write_predictions(self, predictions, features, path_prefix: str, best=None) -> list[str]:
    prefix = paths.path(path_prefix)  # a local path or a gs:// URL
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out = prefix.parent / f"{prefix.name}_summaries.jsonl"
    # summary/reference: sentence lists
    out.write_text("".join(json.dumps({**p, "reference": m["reference"]}) + "\n"
                           for p, m in zip(predictions, features.meta)))
    return [str(out)]

  def optimizer(self, config, num_steps: int):
    if not self.hp["separate_optimizers"]:
      return None
    self.schedule = noam_schedule(float(self.hp["encoder_lr"]), int(self.hp["encoder_warmup"]))  # logged
    return make_optimizer(float(self.hp["encoder_lr"]), int(self.hp["encoder_warmup"]),
                          float(self.hp["new_lr"]), int(self.hp["new_warmup"]),
                          config.optimizer.b1, config.optimizer.b2, 1e-9, config.optimizer.grad_clip)


def make_task(config) -> BertSumTask:
  if "bertsum" not in config:
    raise ValueError("config.bertsum is missing: build the config with finetune_config('bertsum') "
                     "(experiments/bertsum.py does)")
  validate_config(config)
  return BertSumTask(config)
