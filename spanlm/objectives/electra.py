"""ELECTRA's replaced-token-detection objective (Clark et al. 2020), as a pluggable
`spanlm.objectives.base.Objective` (config.objective.name = 'electra').

One jitted step:
  1. prepare:  mask 15% of the tokens with [MASK] (m, x^masked), one sampling seed per row;
  2. sums:     generator logits at m -> x̂_i ~ p_G(· | x^masked) (categorical, stop-gradient)
               -> x^corrupt = REPLACE(x, m, x̂) -> discriminator logits on every token;
  3. loss:     L = Σ_{i∈m} CE_G / N_pred  +  λ · Σ_{t non-pad} BCE_D / N_tokens   (eq. 1, λ = 50)

Each term is a sum over the global batch divided by its own global count, so
gradient accumulation gives exactly the large-batch gradient. The model is
`spanlm.models.electra.ElectraForPretraining`; `params['encoder']` is the
discriminator in BertEncoder's layout (fine-tune it with init_checkpoint = the
pretraining workdir, or take it with `models.electra.discriminator_params`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from spanlm.objectives import base as pretraining
from spanlm.objectives import losses as objectives
from spanlm.objectives import masking
from spanlm.models import electra as electra_model


def default_config() -> ml_collections.ConfigDict:
  """config.electra: experiments attach it with `with c.unlocked(): c.electra = default_config()`."""
  c = ml_collections.ConfigDict()
  c.generator_fraction = 0.25  # generator hidden size / discriminator's (paper: 1/4 to 1/3)
  c.disc_weight = 50.0  # λ in L_MLM + λ L_Disc (paper: 50)
  return c


def validate(config) -> None:
  if "electra" not in config:
    raise ValueError("invalid config: config.electra is missing; start from experiments/electra.py "
                     "or add `c.electra = spanlm.objectives.electra.default_config()`")
  e = config.electra
  if not 0.0 < e.generator_fraction <= 1.0:
    raise ValueError(f"invalid config: config.electra.generator_fraction={e.generator_fraction} "
                     "must be in (0, 1] (the paper uses 1/4 to 1/3)")
  if e.disc_weight < 0:
    raise ValueError(f"invalid config: config.electra.disc_weight={e.disc_weight} must be >= 0")


def build_model(config, vocab_size: int) -> electra_model.ElectraForPretraining:
  validate(config)
  if config.data.get("packing", "document") == "packed":
    raise NotImplementedError(f"objective {config.objective.name!r} does not pass packed rows' "
                              "position_ids/packing_ids to its model; use data.packing=document or full_sentences")
  return electra_model.ElectraForPretraining(
      pretraining.encoder_config(config, vocab_size),
      generator_fraction=float(config.electra.generator_fraction))


class Electra(pretraining.Objective):
  name = "electra"

  def __init__(self, config, vocab_size, word_start_table):
    self.num_predictions = masking.max_predictions(config.train.seq_len, config.masking.rate,
                                                   config.masking.get("max_predictions", 0))
    super().__init__(config, vocab_size, word_start_table)

  def build_model(self):
    return build_model(self.config, self.vocab_size)

  def prepare(self, rng, batch):
    mask_rng, sample_rng = jax.random.split(rng)
    ids = batch["input_ids"]
    masked = masking.apply_masking(mask_rng, ids, self.word_start_table, self.config.masking,
                                   vocab_size=self.vocab_size)
    preds = objectives.select_predictions(masked, self.num_predictions)
    return dict(input_ids=ids, masked_ids=masked.input_ids, segment_ids=batch["segment_ids"],
                attention_mask=ids != masking.PAD_ID, positions=preds.positions,
                targets=preds.targets, weights=preds.weights,
                sample_seeds=jax.random.bits(sample_rng, (ids.shape[0],), jnp.uint32))

  def denominators(self, prepared):
    return {"num_predictions": jnp.sum(prepared["weights"]),
            "num_tokens": jnp.sum(prepared["attention_mask"].astype(jnp.float32)),
            "rows": jnp.float32(prepared["input_ids"].shape[0])}

  def sums(self, params, mb, rng, deterministic, frozen=None):
    rngs = None if deterministic else {"dropout": rng}
    g_rngs = d_rngs = rngs
    if rngs is not None:
      g_key, d_key = jax.random.split(rng)
      g_rngs, d_rngs = {"dropout": g_key}, {"dropout": d_key}
    variables = {"params": params}
    model = self.model
    logits = model.apply(variables, mb["masked_ids"], mb["segment_ids"], mb["attention_mask"],
                         mb["positions"], deterministic, rngs=g_rngs, method=model.generate)
    mlm_loss, mlm_correct = objectives.weighted_cross_entropy(logits, mb["targets"], mb["weights"],
                                                              self.vocab_size)
    sampled = electra_model.sample_replacements(mb["sample_seeds"], logits, self.vocab_size,
                                                masking.NUM_RESERVED)
    corrupted = electra_model.corrupt(mb["input_ids"], mb["positions"], mb["weights"], sampled)
    # A sample equal to the original is 'original' (§2): labels compare tokens, not positions.
    labels = (corrupted != mb["input_ids"]).astype(jnp.float32)
    rtd = model.apply(variables, corrupted, mb["segment_ids"], mb["attention_mask"], deterministic,
                      rngs=d_rngs, method=model.discriminate)
    tok = mb["attention_mask"].astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(rtd, labels)
    pred = (rtd > 0).astype(jnp.float32)
    return {"num_predictions": jnp.sum(mb["weights"]),
            "mlm_loss": mlm_loss, "mlm_correct": mlm_correct,
            "disc_loss": jnp.sum(bce * tok), "disc_correct": jnp.sum((pred == labels) * tok),
            "replaced": jnp.sum(labels * tok),
            "replaced_detected": jnp.sum(labels * pred * tok)}

  def loss(self, sums, den):
    per = pretraining.per
    return (per(sums["mlm_loss"], den["num_predictions"])
            + float(self.config.electra.disc_weight) * per(sums["disc_loss"], den["num_tokens"]))

  def metrics(self, sums, den):
    per = pretraining.per
    n, t = den["num_predictions"], den["num_tokens"]
    return {"loss": self.loss(sums, den),
            "mlm_loss": per(sums["mlm_loss"], n), "mlm_accuracy": per(sums["mlm_correct"], n),
            "disc_loss": per(sums["disc_loss"], t), "disc_accuracy": per(sums["disc_correct"], t),
            # Share of tokens the generator actually changed, and the discriminator's recall on them.
            "replaced_fraction": per(sums["replaced"], t),
            "disc_recall": per(sums["replaced_detected"], sums["replaced"])}

  def eval_metrics(self, sums, den):
    out = {f"eval/{k}": float(v) for k, v in self.metrics(sums, den).items()}
    out["eval/perplexity"] = float(jnp.exp(jnp.minimum(out["eval/mlm_loss"], 50.0)))
    return out

  def log_summary(self, metrics, prefix=""):
    g = lambda k: metrics.get(prefix + k, float("nan"))
    return (f"loss {g('loss'):.3f} | gen mlm {g('mlm_loss'):.3f} acc {g('mlm_accuracy'):.3f} | "
            f"disc {g('disc_loss'):.3f} acc {g('disc_accuracy'):.3f} | "
            f"replaced {g('replaced_fraction'):.3f} recall {g('disc_recall'):.3f}")
