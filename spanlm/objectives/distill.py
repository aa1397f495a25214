"""Knowledge distillation of a pretrained spanlm teacher into a smaller student
(config.objective.name = 'distill').

DistilBERT (Sanh et al. 2019; Hugging Face `distiller.py`) trains the student on
the teacher's soft targets; TinyBERT (Jiao et al. 2020, §3.1; its
`general_distill.py`) also matches hidden states and attention scores through a
layer mapping. With student layers m = 1..M, teacher layers n = 1..N and the
uniform mapping g(m) = m·N/M (g(0) = 0, the embeddings):

  L_soft = T² Σ_{t∈S} KL( softmax(z^T_t / T) || softmax(z^S_t / T) ) / |S|
           S = every non-[PAD] token (DistilBERT's default), or the masked ones
           (`soft_targets='masked'`, DistilBERT's --restrict_ce_to_mask)
  L_hard = Σ_{i∈masked} CE(z^S_i, x_i) / N_pred                    (the usual MLM loss)
  L_cos  = Σ_{t non-pad} (1 - cos(h^S_{M,t} W_h, h^T_{N,t})) / N_tok  (DistilBERT's L_cos)
  L_hid  = Σ_{m=0..M} mean_{b,t,d} (h^S_{m} W_h + b - h^T_{g(m)})²        (TinyBERT: summed
  L_attn = Σ_{m=1..M} mean_{b,h,q,k} (S^S_m - S^T_{g(m)})²                  over layers)
  L = α_soft L_soft + α_hard L_hard + α_cos L_cos + α_hid L_hid + α_attn L_attn

S are the PRE-softmax attention scores q·kᵀ/√d with masked keys set to 0, as
TinyBERT (`torch.where(att <= -1e2, 0, att)`); the means run over every position
of the [B, L] block, padding included, as TinyBERT's MSELoss does. T² keeps the
soft-target gradients' scale independent of T (Hinton et al. 2015). W_h
(`distill_project`, models/distill.py) is learned when the widths differ
(TinyBERT eq. 8). Head counts must agree for TinyBERT; here they are
head-averaged when they differ (an extension). The teacher runs
deterministically under stop_gradient; its parameters come in as the Trainer's
`frozen` input (never trained, never checkpointed). Masked positions may be
chosen with DistilBERT's `mlm_smoothing` (config.masking.smoothing, p ∝ count^-0.7).

With `init_from_teacher` the student starts from the teacher (DistilBERT's
`scripts/extract_distilbert.py`): embeddings, MLM head and teacher layers
round(m (N-1)/(M-1)) for m = 0..M-1 ([0, 2, 4, 7, 9, 11] for 6 of 12: "one layer
out of two"). Any spanlm pretraining workdir with an MLM head can teach: BERT,
RoBERTa, SpanBERT (its SBO head is ignored), MLM+NSP/SOP (pooler and pair head
ignored), MAPNet, a distilled student; not ELECTRA's discriminator (no MLM head)
nor a teacher with shared layers (ALBERT: no per-layer outputs to match).
"""

from __future__ import annotations

import os

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spanlm import parallel
from spanlm.objectives import base as pretraining
from spanlm.objectives.mlm import MaskedLM
from spanlm.models.bert import BertConfig, Embeddings, EncoderLayer, to_layout, unstack_layers
from spanlm.models.distill import DistilStudent
from spanlm.models.heads import BertForPretraining

SAMPLE_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "sample", "sample_sp8k.model")


def default_config() -> ml_collections.ConfigDict:
  """config.distill: attach with `with c.unlocked(): c.distill = default_config()`."""
  c = ml_collections.ConfigDict()
  c.teacher_workdir = ""  # a spanlm pretraining workdir (config.json + checkpoints/); required
  c.temperature = 2.0  # T of the soft targets (DistilBERT: 2)
  c.soft_weight = 1.0  # α_soft, weight of T²·KL(teacher || student)
  c.soft_targets = "all"  # KL over: all (every non-pad token, DistilBERT) | masked (--restrict_ce_to_mask)
  c.hard_weight = 1.0  # α_hard, weight of the ordinary MLM cross-entropy
  c.cosine_weight = 0.0  # α_cos, DistilBERT's cosine loss on the last hidden states (0 = off)
  c.hidden_weight = 1.0  # α_hid, TinyBERT hidden-state MSE, summed over the mapped layers (0 = off)
  c.attention_weight = 1.0  # α_attn, TinyBERT pre-softmax attention-score MSE, summed (0 = off)
  c.init_from_teacher = False  # start from the teacher's embeddings, MLM head and every other layer
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
  if d.soft_targets not in ("all", "masked"):
    raise ValueError(f"invalid config: config.distill.soft_targets={d.soft_targets!r}; choose all or masked")
  for k in ("soft_weight", "hard_weight", "cosine_weight", "hidden_weight", "attention_weight"):
    if d[k] < 0:
      raise ValueError(f"invalid config: config.distill.{k}={d[k]} must be >= 0")
  if config.model.get("share_layers", "none") != "none":
    raise NotImplementedError("distillation reads per-layer outputs: config.model.share_layers "
                              "must be 'none' for the student")


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
  """g(m) for m = 0..M: 0 for the embeddings, then the uniform mapping round(m·N/M)."""
  return [0] + [int(round(m * teacher_layers / student_layers)) for m in range(1, student_layers + 1)]


# --- teacher -------------------------------------------------------------------------------------
def load_teacher(workdir: str):
  """(teacher ConfigDict, tokenizer path, raw params as numpy) of a pretraining workdir's newest intact step."""
  from spanlm import workdir as workdir_lib

  try:
    tconfig, tokenizer, _, params = workdir_lib.load_pretrained(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"teacher workdir {workdir!r}: {e}") from None
  return tconfig, tokenizer, params


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
  return method_name == "__call__" and isinstance(mdl, (Embeddings, EncoderLayer))


def internals(variables, cfg: BertConfig, attention_mask):
  """(hidden states [emb, layer_1..layer_n] each [B, L, H], pre-softmax attention scores each
  [B, h, L, L] with masked keys set to 0), from `capture_intermediates` and the scores
  SelfAttention sows into 'attentions'."""
  # Scanned layers sow stacked [layers, ...] values under `layers`: unroll them to layer_i first.
  enc = unstack_layers(variables["intermediates"]["encoder"])
  scores = flax.traverse_util.flatten_dict(
      {k: unstack_layers(v) if k == "encoder" else v for k, v in variables["attentions"].items()})
  scores = {path: v[0] for path, v in scores.items() if path[-1] == "scores"}
  layer_of = lambda path: next(int(p[len("layer_"):]) for p in path if p.startswith("layer_"))
  ordered = [v for _, v in sorted(scores.items(), key=lambda kv: layer_of(kv[0]))]
  if len(ordered) != cfg.num_layers:
    raise ValueError(f"expected {cfg.num_layers} layers' attention scores, found {len(ordered)}")
  mask = attention_mask.astype(bool)[:, None, None, :]
  hidden = [enc["embeddings"]["__call__"][0]] + [enc[f"layer_{i}"]["__call__"][0] for i in range(cfg.num_layers)]
  return hidden, [jnp.where(mask, a.astype(jnp.float32), 0.0) for a in ordered]


def soft_target_sum(student_logits, teacher_logits, weights, temperature: float, num_classes: int):
  """T² Σ_i w_i KL(softmax(t_i/T) || softmax(s_i/T)) over the weighted positions."""
  V = student_logits.shape[-1]
  valid = jnp.arange(V) < num_classes
  s = jnp.where(valid, student_logits.astype(jnp.float32) / temperature, -1e9)
  t = jnp.where(valid, teacher_logits.astype(jnp.float32) / temperature, -1e9)
  log_ps, log_pt = jax.nn.log_softmax(s), jax.nn.log_softmax(t)
  kl = jnp.sum(jnp.where(valid, jnp.exp(log_pt) * (log_pt - log_ps), 0.0), axis=-1)
  return temperature ** 2 * jnp.sum(kl * weights)


def score_sq_error_sum(student, teacher):
  """Σ (S^S - S^T)² over every [B, h, L, L] entry (head-averaged first when head counts differ)."""
  if student.shape[1] != teacher.shape[1]:
    student, teacher = student.mean(1, keepdims=True), teacher.mean(1, keepdims=True)
  return jnp.sum((student - teacher) ** 2)


def cosine_sum(student, teacher, token_weights):
  """Σ_t w_t (1 - cos(s_t, t_t)) over positions (DistilBERT's CosineEmbeddingLoss with target 1)."""
  s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
  cos = jnp.sum(s * t, -1) / jnp.maximum(jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), 1e-8)
  return jnp.sum((1.0 - cos) * token_weights)


def student_layers_from_teacher(student_layers: int, teacher_layers: int) -> list[int]:
  """Teacher layer copied into each student layer: round(m (N-1)/(M-1)), DistilBERT's
  [0, 2, 4, 7, 9, 11] for 6 of 12."""
  if student_layers > teacher_layers:
    raise ValueError(f"a student of {student_layers} layers cannot start from a teacher of {teacher_layers}")
  if student_layers == 1:
    return [0]
  return [int(round(m * (teacher_layers - 1) / (student_layers - 1))) for m in range(student_layers)]


class Distill(MaskedLM):
  """Masking and MLM sums from MaskedLM; the teacher arrives as `frozen` in `sums`."""

  name = "distill"
  TEACHER_KEYS = ("encoder", "mlm_transform", "mlm_bias")  # what a teacher contributes

  def __init__(self, config, vocab_size, word_start_table):
    validate(config)
    self.teacher_config, tok_path, raw = load_teacher(config.distill.teacher_workdir)
    check_vocabulary(tok_path, vocab_size, word_start_table)
    missing = [k for k in self.TEACHER_KEYS if k not in raw]
    if missing:
      raise ValueError(f"the teacher in {config.distill.teacher_workdir} has no MLM head ({missing} "
                       "missing from its params; an ELECTRA discriminator cannot give soft targets)")
    # An MLM+NSP/SOP teacher's encoder carries a pooler: build the teacher with one.
    pooler = "pooler" in raw["encoder"]
    self.teacher_cfg = pretraining.encoder_config(self.teacher_config, vocab_size, use_pooler=pooler)
    if self.teacher_cfg.share_layers != "none":
      raise NotImplementedError("a teacher with shared layers (ALBERT) is not supported: its layers "
                                "have no outputs of their own to distil from")
    rows = np.asarray(raw["encoder"]["embeddings"]["word_embeddings"]).shape[0]
    if rows != self.teacher_cfg.vocab_size:
      raise ValueError(f"the teacher's embedding table has {rows} rows, but its config and this "
                       f"vocabulary give {self.teacher_cfg.vocab_size}: not the same vocabulary")
    self.teacher = BertForPretraining(self.teacher_cfg)
    self._teacher_raw = {k: raw[k] for k in self.TEACHER_KEYS}  # SBO/pair heads are not needed
    self._teacher_raw["encoder"] = to_layout(raw["encoder"], self.teacher_cfg.scanned)
    super().__init__(config, vocab_size, word_start_table)
    if self.model.cfg.vocab_size != self.teacher_cfg.vocab_size:
      raise ValueError(f"student embedding rows {self.model.cfg.vocab_size} != teacher's "
                       f"{self.teacher_cfg.vocab_size}: use the same config.model.vocab_multiple")
    self.mapping = layer_map(self.model.cfg.num_layers, self.teacher_cfg.num_layers)
    if config.distill.init_from_teacher:
      s, t = self.model.cfg, self.teacher_cfg
      if (s.hidden_size, s.num_heads, s.intermediate_size, s.embed_dim) != (
          t.hidden_size, t.num_heads, t.intermediate_size, t.embed_dim):
        raise ValueError("config.distill.init_from_teacher needs the teacher's layer shape (hidden "
                         f"{t.hidden_size}, heads {t.num_heads}, FFN {t.intermediate_size}); the student "
                         f"has {s.hidden_size}/{s.num_heads}/{s.intermediate_size}. Set the same sizes "
                         "or init_from_teacher=False")
      self.copied_layers = student_layers_from_teacher(s.num_layers, t.num_layers)

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
    boxed = {k: boxed[k] for k in self.TEACHER_KEYS}
    shardings = parallel.logical_shardings(boxed, mesh) if mesh is not None else None
    abstract = nn.meta.unbox(boxed)
    got, want = jax.tree.structure(self._teacher_raw), jax.tree.structure(abstract)
    if got != want:
      raise ValueError(f"the teacher checkpoint's parameter tree does not match its config "
                       f"(config.json of {self.config.distill.teacher_workdir}):\n{got}\nvs\n{want}")
    raw = jax.tree.map(lambda a, s: np.asarray(a, s.dtype), self._teacher_raw, abstract)
    return jax.device_put(raw, shardings) if shardings is not None else jax.tree.map(jnp.asarray, raw)

  def initial_params(self, params, frozen):
    """DistilBERT's initialisation from the teacher (`init_from_teacher`), else `params`."""
    if not self.config.distill.init_from_teacher:
      return params
    params = dict(params)
    enc = dict(unstack_layers(params["encoder"]))  # either side may be scanned: copy layer by layer
    teacher = unstack_layers(frozen["encoder"])
    enc["embeddings"] = teacher["embeddings"]
    for m, n in enumerate(self.copied_layers):
      enc[f"layer_{m}"] = teacher[f"layer_{n}"]
    params["encoder"] = to_layout(enc, self.model.cfg.scanned)
    params["mlm_transform"], params["mlm_bias"] = frozen["mlm_transform"], frozen["mlm_bias"]
    return params

  def _forward(self, module, params, mb, rng, deterministic, positions):
    return module.apply({"params": params}, mb["input_ids"], mb["segment_ids"], mb["attention_mask"],
                        positions, deterministic=deterministic,
                        rngs=None if deterministic else {"dropout": rng},
                        capture_intermediates=_capture, mutable=["intermediates", "attentions"])

  def sums(self, params, mb, rng, deterministic, frozen=None):
    if frozen is None:
      raise ValueError("distillation needs the teacher's params as the Trainer's frozen input")
    d = self.config.distill
    everywhere = d.soft_targets == "all"
    if everywhere:  # logits at every position: soft targets on all tokens, hard loss gathered
      batch, seq_len = mb["input_ids"].shape
      positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    else:
      positions = mb["positions"]
    out_s, var_s = self._forward(self.model, params, mb, rng, deterministic, positions)
    out_t, var_t = self._forward(self.teacher, frozen, mb, None, True, positions)
    out_t, var_t = jax.lax.stop_gradient((out_t, var_t))
    tok = mb["attention_mask"].astype(jnp.float32)
    if everywhere:
      gather = lambda x: jnp.take_along_axis(x, mb["positions"][..., None], axis=1)
      sums = self._mlm_sums({"mlm_logits": gather(out_s["mlm_logits"])}, mb)
      soft_w = tok
    else:
      sums = self._mlm_sums({"mlm_logits": out_s["mlm_logits"]}, mb)
      soft_w = mb["weights"]
    sums["soft_loss"] = soft_target_sum(out_s["mlm_logits"], out_t["mlm_logits"], soft_w,
                                        float(d.temperature), self.vocab_size)
    hid_s, att_s = internals(var_s, self.model.cfg, mb["attention_mask"])
    hid_t, att_t = internals(var_t, self.teacher_cfg, mb["attention_mask"])
    project = lambda h: self.model.apply({"params": params}, h, method=self.model.project).astype(jnp.float32)
    sums["cosine_loss"] = cosine_sum(project(hid_s[-1]), hid_t[-1], tok)
    seq_len, width = mb["input_ids"].shape[1], self.teacher_cfg.hidden_size
    hidden = attention = 0.0
    for m, n in enumerate(self.mapping):  # TinyBERT sums the per-layer MSEs
      hidden = hidden + jnp.sum((project(hid_s[m]) - hid_t[n].astype(jnp.float32)) ** 2) / (seq_len * width)
      if m > 0:
        heads = att_s[m - 1].shape[1] if att_s[m - 1].shape[1] == att_t[n - 1].shape[1] else 1
        attention = attention + score_sq_error_sum(att_s[m - 1], att_t[n - 1]) / (heads * seq_len * seq_len)
    sums.update(hidden_loss=hidden, attention_loss=attention)
    return sums

  def denominators(self, prepared):
    den = super().denominators(prepared)
    den["num_tokens"] = jnp.sum(prepared["attention_mask"].astype(jnp.float32))
    return den

  def _soft_count(self, den):
    return den["num_tokens"] if self.config.distill.soft_targets == "all" else den["num_predictions"]

  def loss(self, sums, den):
    d, per = self.config.distill, pretraining.per
    # hidden/attention sums are per-row means (over positions and features): / rows = TinyBERT's mean.
    return (float(d.soft_weight) * per(sums["soft_loss"], self._soft_count(den))
            + float(d.hard_weight) * per(sums["mlm_loss"], den["num_predictions"])
            + float(d.cosine_weight) * per(sums["cosine_loss"], den["num_tokens"])
            + float(d.hidden_weight) * per(sums["hidden_loss"], den["rows"])
            + float(d.attention_weight) * per(sums["attention_loss"], den["rows"]))

  def metrics(self, sums, den):
    out = super().metrics(sums, den)
    per = pretraining.per
    out.update(loss=self.loss(sums, den), soft_loss=per(sums["soft_loss"], self._soft_count(den)),
               cosine_loss=per(sums["cosine_loss"], den["num_tokens"]),
               hidden_loss=per(sums["hidden_loss"], den["rows"]),
               attention_loss=per(sums["attention_loss"], den["rows"]))
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
