"""Knowledge distillation of a pretrained MLM teacher into a smaller student
(config.objective.name = 'distill').

DistilBERT (Sanh et al. 2019) trains the student on the teacher's soft targets;
TinyBERT (Jiao et al. 2020, §3.1) also matches intermediate representations
through a layer mapping. With student layers m = 1..M, teacher layers n = 1..N
and the uniform mapping g(m) = m·N/M (g(0) = 0, the embeddings):

  L_soft = T² Σ_{i∈masked} KL( softmax(z^T_i / T) || softmax(z^S_i / T) ) / N_pred
  L_hard = Σ_{i∈masked} CE(z^S_i, x_i) / N_pred                     (the usual MLM loss)
  L_hid  = Σ_{m=0..M} Σ_{tokens t} ||h^S_{m,t} W_h + b - h^T_{g(m),t}||² / (H_T (M+1) N_tok)
  L_attn = Σ_{m=1..M} Σ_{queries t} (1/h) Σ_heads Σ_k (A^S_{m,t,k} - A^T_{g(m),t,k})² / (M N_tok)
  L = α_soft L_soft + α_hard L_hard + α_hid L_hid + α_attn L_attn

T² keeps the soft-target gradients' scale independent of T (Hinton et al. 2015).
W_h (`distill_project`) is learned when the widths differ (TinyBERT eq. 8),
absent when they agree; attention maps are the softmax probabilities, compared
per head when the head counts agree and head-averaged otherwise. The teacher
runs deterministically, its outputs under stop_gradient; its parameters come in
as the Trainer's `frozen` input (never trained, never checkpointed).

Internals (hidden states, attention probabilities) are read without changing
the encoder: flax's `capture_intermediates` records each layer's output and the
attention query/key projections, from which A = softmax(q kᵀ/√d + mask) is
recomputed (differentiably for the student).
"""

from __future__ import annotations

import glob
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spanlm import masking, objectives, parallel, pretraining
from spanlm.models.bert import (BertConfig, Embeddings, EncoderLayer, SelfAttention, dense, to_layout,
                               unstack_layers)
from spanlm.models.heads import BertForPretraining

SAMPLE_TOKENIZER = os.path.join(os.path.dirname(__file__), "data", "sample", "sample_sp8k.model")


def default_config() -> ml_collections.ConfigDict:
  """config.distill: attach with `with c.unlocked(): c.distill = default_config()`."""
  c = ml_collections.ConfigDict()
  c.teacher_workdir = ""  # a spanlm pretraining workdir (config.json + checkpoints/); required
  c.temperature = 2.0  # T of the soft targets (DistilBERT: 2)
  c.soft_weight = 1.0  # α_soft, weight of T²·KL(teacher || student) at masked positions
  c.hard_weight = 1.0  # α_hard, weight of the ordinary MLM cross-entropy
  c.hidden_weight = 1.0  # α_hid, hidden-state MSE through the layer mapping (0 = off)
  c.attention_weight = 1.0  # α_attn, attention-probability MSE through the mapping (0 = off)
  return c


def validate(config) -> None:
  if "distill" not in config:
    raise ValueError("invalid config: config.distill is missing; start from experiments/distill.py")
  d = config.distill
  if not d.teacher_workdir:
    raise ValueError("invalid config: config.distill.teacher_workdir is empty; pass a pretraining "
                     "workdir, e.g. --config.distill.teacher_workdir=/tmp/bert_tiny")
  if d.temperature <= 0:
    raise ValueError(f"invalid config: config.distill.temperature={d.temperature} must be > 0")
  for k in ("soft_weight", "hard_weight", "hidden_weight", "attention_weight"):
    if d[k] < 0:
      raise ValueError(f"invalid config: config.distill.{k}={d[k]} must be >= 0")
  if config.model.get("share_layers", "none") != "none":
    raise NotImplementedError("distillation reads per-layer outputs: config.model.share_layers "
                              "must be 'none' for the student")


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
  """g(m) for m = 0..M: 0 for the embeddings, then the uniform mapping round(m·N/M)."""
  return [0] + [int(round(m * teacher_layers / student_layers)) for m in range(1, student_layers + 1)]


# --- teacher -------------------------------------------------------------------------------------
def _teacher_tokenizer(workdir: str, tconfig) -> str:
  found = sorted(glob.glob(os.path.join(workdir, "data", "*", "*.model")))
  if found:
    return found[0]
  return tconfig.data.get("tokenizer", "") or SAMPLE_TOKENIZER


def load_teacher(workdir: str):
  """(teacher ConfigDict, tokenizer path, raw params as numpy) of a pretraining workdir's latest step."""
  from spanlm import checkpoint as ckpt_lib

  cfg_path = os.path.join(workdir, "config.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isfile(cfg_path) or not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"teacher workdir {workdir!r} has no config.json or checkpoints/; give the "
                            "--workdir of a finished spanlm pretraining run")
  with open(cfg_path) as f:
    tconfig = ml_collections.ConfigDict(json.load(f))
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  if not steps:
    raise FileNotFoundError(f"teacher workdir {workdir!r}: checkpoints/ holds no checkpoint")
  state, _ = ckpt_lib.read_raw(os.path.join(ckpt_dir, str(steps[-1])))
  return tconfig, _teacher_tokenizer(workdir, tconfig), state["params"]


def check_vocabulary(teacher_tokenizer: str, student_vocab_size: int, student_word_starts) -> None:
  """Same vocabulary or a clear error: soft targets are distributions over the same token ids."""
  from spanlm.data.tokenizer import Tokenizer

  tok = Tokenizer.load(teacher_tokenizer)
  same = tok.vocab_size == student_vocab_size and np.array_equal(
      tok.word_start_table(), np.asarray(student_word_starts))
  if not same:
    raise ValueError(
        f"the teacher's vocabulary ({teacher_tokenizer}, {tok.vocab_size} tokens) differs from the "
        f"student's ({student_vocab_size} tokens): soft targets need the same token ids. Train the "
        f"student with the teacher's tokenizer: --config.data.tokenizer={teacher_tokenizer}")


# --- internals -----------------------------------------------------------------------------------
def _capture(mdl, method_name):
  return method_name == "__call__" and (
      isinstance(mdl, (Embeddings, EncoderLayer))
      or (mdl.name in ("query", "key") and isinstance(mdl.parent, SelfAttention)))


def internals(intermediates, cfg: BertConfig, attention_mask):
  """(hidden states [emb, layer_1..layer_n] each [B, L, H], attention probs each [B, h, L, L])."""
  enc = unstack_layers(intermediates["encoder"])  # scanned layers: [layers, ...] -> per layer
  hidden = [enc["embeddings"]["__call__"][0]]
  probs = []
  mask = attention_mask.astype(bool)[:, None, None, :]
  for i in range(cfg.num_layers):
    layer = enc[f"layer_{i}"]
    hidden.append(layer["__call__"][0])
    q = layer["attention"]["query"]["__call__"][0].astype(jnp.float32)
    k = layer["attention"]["key"]["__call__"][0].astype(jnp.float32)
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    probs.append(jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1))
  return hidden, probs


def soft_target_sum(student_logits, teacher_logits, weights, temperature: float, num_classes: int):
  """T² Σ_i w_i KL(softmax(t_i/T) || softmax(s_i/T)) over predicted positions."""
  V = student_logits.shape[-1]
  valid = jnp.arange(V) < num_classes
  s = jnp.where(valid, student_logits.astype(jnp.float32) / temperature, -1e9)
  t = jnp.where(valid, teacher_logits.astype(jnp.float32) / temperature, -1e9)
  log_ps, log_pt = jax.nn.log_softmax(s), jax.nn.log_softmax(t)
  kl = jnp.sum(jnp.where(valid, jnp.exp(log_pt) * (log_pt - log_ps), 0.0), axis=-1)
  return temperature ** 2 * jnp.sum(kl * weights)


def attention_mse_sum(student, teacher, token_weights):
  """Σ_queries (1/h) Σ_heads Σ_keys (A^S - A^T)², head-averaged first when head counts differ."""
  if student.shape[1] != teacher.shape[1]:
    student, teacher = student.mean(1, keepdims=True), teacher.mean(1, keepdims=True)
  per_query = jnp.sum((student - teacher) ** 2, axis=-1).mean(axis=1)  # [B, L]
  return jnp.sum(per_query * token_weights)


# --- student -------------------------------------------------------------------------------------
class DistilStudent(BertForPretraining):
  """BertForPretraining + W_h (`distill_project`) to the teacher's width when the widths differ."""

  teacher_hidden: int = 0

  def setup(self):
    super().setup()
    if self.teacher_hidden and self.teacher_hidden != self.cfg.hidden_size:
      self.distill_project = dense(self.cfg, self.teacher_hidden, ("embed", "embed_out"), "distill_project")

  def project(self, hidden):
    if self.teacher_hidden and self.teacher_hidden != self.cfg.hidden_size:
      return self.distill_project(hidden)
    return hidden

  def __call__(self, *args, **kwargs):
    out = super().__call__(*args, **kwargs)
    if self.teacher_hidden and self.teacher_hidden != self.cfg.hidden_size:
      self.project(jnp.zeros((1, self.cfg.hidden_size), self.cfg.dtype))  # creates W_h at init
    return out


class Distill(pretraining.MaskedLM):
  """Masking and MLM sums from MaskedLM; the teacher arrives as `frozen` in `sums`."""

  name = "distill"

  def __init__(self, config, vocab_size, word_start_table):
    validate(config)
    self.teacher_config, tok_path, raw = load_teacher(config.distill.teacher_workdir)
    check_vocabulary(tok_path, vocab_size, word_start_table)
    self.teacher_cfg = pretraining.encoder_config(self.teacher_config, vocab_size)
    if self.teacher_cfg.share_layers != "none":
      raise NotImplementedError("a teacher with shared layers (ALBERT) is not supported")
    missing = [k for k in ("encoder", "mlm_transform", "mlm_bias") if k not in raw]
    if missing:
      raise ValueError(f"the teacher in {config.distill.teacher_workdir} has no MLM head ({missing} "
                       "missing from its params; an ELECTRA discriminator cannot give soft targets)")
    rows = np.asarray(raw["encoder"]["embeddings"]["word_embeddings"]).shape[0]
    if rows != self.teacher_cfg.vocab_size:
      raise ValueError(f"the teacher's embedding table has {rows} rows, but its config and this "
                       f"vocabulary give {self.teacher_cfg.vocab_size}: not the same vocabulary")
    self.teacher = BertForPretraining(self.teacher_cfg)
    self._teacher_raw = {k: raw[k] for k in ("encoder", "mlm_transform", "mlm_bias")}
    self._teacher_raw["encoder"] = to_layout(raw["encoder"], self.teacher_cfg.scanned)
    super().__init__(config, vocab_size, word_start_table)
    if self.model.cfg.vocab_size != self.teacher_cfg.vocab_size:
      raise ValueError(f"student embedding rows {self.model.cfg.vocab_size} != teacher's "
                       f"{self.teacher_cfg.vocab_size}: use the same config.model.vocab_multiple")
    self.mapping = layer_map(self.model.cfg.num_layers, self.teacher_cfg.num_layers)

  def build_model(self):
    if self.config.data.get("packing", "document") == "packed":
      raise NotImplementedError("distillation with data.packing='packed' is not supported")
    cfg = pretraining.encoder_config(self.config, self.vocab_size)
    return DistilStudent(cfg, teacher_hidden=self.teacher_cfg.hidden_size)

  def frozen_inputs(self, mesh):
    ids = jnp.zeros((1, self.seq_len), jnp.int32)
    pos = jnp.zeros((1, self.num_predictions), jnp.int32)
    boxed = jax.eval_shape(lambda: self.teacher.init({"params": jax.random.PRNGKey(0)}, ids, ids,
                                                     ids != 0, pos)["params"])
    shardings = parallel.logical_shardings(boxed, mesh)
    abstract = nn.meta.unbox(boxed)
    raw = jax.tree.map(lambda a, s: np.asarray(a, s.dtype), self._teacher_raw, abstract)
    got, want = jax.tree.structure(raw), jax.tree.structure(abstract)
    if got != want:
      raise ValueError(f"the teacher checkpoint's parameter tree does not match its config "
                       f"(config.json of {self.config.distill.teacher_workdir}):\n{got}\nvs\n{want}")
    return jax.device_put(raw, shardings)

  def _forward(self, module, params, mb, rng, deterministic):
    return module.apply({"params": params}, mb["input_ids"], mb["segment_ids"], mb["attention_mask"],
                        mb["positions"], deterministic=deterministic,
                        rngs=None if deterministic else {"dropout": rng},
                        capture_intermediates=_capture, mutable=["intermediates"])

  def sums(self, params, mb, rng, deterministic, frozen=None):
    if frozen is None:
      raise ValueError("distillation needs the teacher's params as the Trainer's frozen input")
    d = self.config.distill
    out_s, inter_s = self._forward(self.model, params, mb, rng, deterministic)
    out_t, inter_t = self._forward(self.teacher, frozen, mb, None, True)
    out_t, inter_t = jax.lax.stop_gradient((out_t, inter_t))
    sums = self._mlm_sums(out_s, mb)
    sums["soft_loss"] = soft_target_sum(out_s["mlm_logits"], out_t["mlm_logits"], mb["weights"],
                                        float(d.temperature), self.vocab_size)
    tok = mb["attention_mask"].astype(jnp.float32)
    hid_s, att_s = internals(inter_s["intermediates"], self.model.cfg, mb["attention_mask"])
    hid_t, att_t = internals(inter_t["intermediates"], self.teacher_cfg, mb["attention_mask"])
    hidden, attention = 0.0, 0.0
    for m, n in enumerate(self.mapping):
      proj = self.model.apply({"params": params}, hid_s[m], method=self.model.project)
      err = jnp.sum((proj.astype(jnp.float32) - hid_t[n].astype(jnp.float32)) ** 2, -1)
      hidden = hidden + jnp.sum(err * tok) / (self.teacher_cfg.hidden_size * len(self.mapping))
      if m > 0:
        attention = attention + attention_mse_sum(att_s[m - 1], att_t[n - 1], tok) / (len(self.mapping) - 1)
    sums.update(hidden_loss=hidden, attention_loss=attention)
    return sums

  def denominators(self, prepared):
    den = super().denominators(prepared)
    den["num_tokens"] = jnp.sum(prepared["attention_mask"].astype(jnp.float32))
    return den

  def loss(self, sums, den):
    d, per = self.config.distill, pretraining._per
    n, t = den["num_predictions"], den["num_tokens"]
    return (float(d.soft_weight) * per(sums["soft_loss"], n) + float(d.hard_weight) * per(sums["mlm_loss"], n)
            + float(d.hidden_weight) * per(sums["hidden_loss"], t)
            + float(d.attention_weight) * per(sums["attention_loss"], t))

  def metrics(self, sums, den):
    out = super().metrics(sums, den)
    per, n, t = pretraining._per, den["num_predictions"], den["num_tokens"]
    out.update(loss=self.loss(sums, den), soft_loss=per(sums["soft_loss"], n),
               hidden_loss=per(sums["hidden_loss"], t), attention_loss=per(sums["attention_loss"], t))
    return out

  def eval_metrics(self, sums, den):
    out = super().eval_metrics(sums, den)
    m = self.metrics(sums, den)
    out.update({f"eval/{k}": float(m[k]) for k in ("loss", "soft_loss", "hidden_loss", "attention_loss")})
    return out

  def log_summary(self, metrics, prefix=""):
    g = lambda k: metrics.get(prefix + k, float("nan"))
    return (f"loss {g('loss'):.3f} | mlm {g('mlm_loss'):.3f} acc {g('mlm_accuracy'):.3f} | "
            f"soft {g('soft_loss'):.3f} | hid {g('hidden_loss'):.3f} | attn {g('attention_loss'):.4f}")

  def eval_summary(self, result):
    return (f"mlm loss {result['eval/mlm_loss']:.3f} | acc {result['eval/mlm_accuracy']:.3f} | "
            f"soft {result['eval/soft_loss']:.3f}")
