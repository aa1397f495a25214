"""MAPNet: masks drawn from a learned proposal, the MLM loss importance-weighted
(Chen et al., "Variance-reduced language pretraining via a mask proposal network").

Uniform masking picks k of a row's n maskable positions uniformly; the MLM
gradient is then an unbiased but noisy estimate of the full-row gradient
G = (1/n) Σ_i g_i. A proposal network scores every position; we sample the k
masked positions from its distribution a (without replacement) and reweight each
predicted token so the estimate stays unbiased for the *same* target, while a
proposal close to a_i ∝ ||g_i|| lowers its variance.

Sampling design: priority sampling (Duffield, Lund & Thorup 2007). Draw
u_i ~ U(0, 1), priorities r_i = a_i / u_i, keep the k largest (S) and let τ be
the (k+1)-th largest priority (τ = 0 when k = n). The Horvitz-Thompson-style
weight of a kept position is 1 / π_i with π_i = min(1, a_i / τ):

  Ĝ = (1/n) Σ_{i∈S} g_i · max(1, τ / a_i)      is unbiased for (1/n) Σ_i g_i.

Proof: fix i; let τ'_i be the k-th largest priority among j ≠ i. Then i ∈ S iff
r_i > τ'_i, and when i ∈ S, τ = τ'_i. Given τ'_i (independent of u_i),
P(i ∈ S) = min(1, a_i/τ'_i), so E[1(i∈S) max(1, τ/a_i) | τ'_i] = 1 for every i.
This is the same top-k-of-perturbed-scores shape as Gumbel top-k (which uses
exponential instead of uniform noise) but, unlike Gumbel top-k, it has an exact
per-position weight. docs/mapnet.md discusses the variance.

Per predicted token the training weight is w_i = (k/n) · max(1, τ/a_i) = the
uniform inclusion probability over π_i, so Σ_{i∈S} w_i CE_i / Σ_rows k has the
expectation of the uniform-masking loss Σ_{i∈S_unif} CE_i / Σ_rows k (exact when
a token's loss does not depend on which *other* tokens are masked; with context
effects both designs corrupt the same number of tokens, and the estimate targets
the loss under "k masked tokens, the others drawn from a", see docs/mapnet.md).
The weights are constants (stop-gradient): they move the estimate, not the model.

Proposal training: the variance of the estimator is ≈ (1/n²) Σ_i ||g_i||² / (k a_i)
+ const, minimised over the simplex by a_i ∝ ||g_i||. With c_i a cheap proxy
of ||g_i|| (the token's CE, normalised by the row's mean, stop-gradient), the
proposal minimises V(a) = Σ_i c_i² / a_i, whose gradient ∇V = -Σ_i c_i²/a_i² ∇a_i
is estimated without bias from the kept tokens only (Horvitz-Thompson):
  L_prop = (1/n²) Σ_{i∈S} sg(c_i² / π_i) / a_i.

Underflow: a = (1 - ε) softmax(s) + ε/n over maskable positions, so a_i ≥ ε/n and
every weight is ≤ k/(ε·...) bounded; a row whose scores are not finite falls back
to the uniform proposal. Both events are counted (`proposal_underflow` tokens whose
softmax probability is below 1e-30, `proposal_fallback_rows`) and logged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from spanlm.objectives import base as pretraining
from spanlm.objectives import losses as objectives
from spanlm.objectives import masking
from spanlm.models.mapnet import MapnetForPretraining, proposal_config

UNDERFLOW = 1e-30  # a softmax probability below this is counted as underflowed


def default_config() -> ml_collections.ConfigDict:
  """config.mapnet: attach with `with c.unlocked(): c.mapnet = default_config()`."""
  c = ml_collections.ConfigDict()
  c.proposal_layers = 1  # encoder layers of the proposal network
  c.proposal_hidden = 64  # its hidden size (its heads: hidden/64, at least 1)
  c.uniform_mix = 0.1  # ε: a = (1-ε)·softmax + ε/n; bounds every weight (0 < ε <= 1)
  c.proposal_weight = 1.0  # weight of the proposal's variance loss in the total loss
  return c


def validate(config) -> None:
  if "mapnet" not in config:
    raise ValueError("invalid config: config.mapnet is missing; start from experiments/mapnet.py "
                     "or add `c.mapnet = spanlm.objectives.mapnet.default_config()`")
  m = config.mapnet
  if not 0.0 < m.uniform_mix <= 1.0:
    raise ValueError(f"invalid config: config.mapnet.uniform_mix={m.uniform_mix} must be in (0, 1] "
                     "(0 would let a proposal probability underflow and a weight explode)")
  if m.proposal_layers < 1 or m.proposal_hidden < 1 or m.proposal_weight < 0:
    raise ValueError("invalid config: config.mapnet.proposal_layers/proposal_hidden must be >= 1 "
                     "and proposal_weight >= 0")
  if config.masking.scheme != "token":
    raise ValueError(f"invalid config: config.masking.scheme={config.masking.scheme!r}; MAPNet "
                     "proposes single tokens, use 'token'")


# --- the estimator -------------------------------------------------------------------------------
class Proposal(NamedTuple):
  log_a: jax.Array  # [B, L] log proposal probability, -inf at unmaskable positions
  underflow: jax.Array  # [B] tokens whose raw softmax probability underflowed
  fallback: jax.Array  # [B] 1.0 where the row's scores were not finite (uniform used)


def proposal_distribution(scores, maskable, uniform_mix: float) -> Proposal:
  """a = (1-ε) softmax(scores) + ε/n over each row's maskable positions, in log space."""
  scores = scores.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(maskable, axis=1, keepdims=True), 1).astype(jnp.float32)
  bad = ~jnp.all(jnp.isfinite(scores) | ~maskable, axis=1, keepdims=True)
  scores = jnp.where(bad | ~maskable, jnp.where(maskable, 0.0, -jnp.inf), scores)
  log_p = jax.nn.log_softmax(scores, axis=1)
  underflow = jnp.sum((jnp.exp(log_p) < UNDERFLOW) & maskable, axis=1).astype(jnp.float32)
  if uniform_mix >= 1.0:
    log_a = jnp.broadcast_to(-jnp.log(n), scores.shape)
  else:
    log_a = jnp.logaddexp(jnp.log1p(-uniform_mix) + log_p, jnp.log(uniform_mix) - jnp.log(n))
  log_a = jnp.where(maskable, log_a, -jnp.inf)
  return Proposal(log_a, underflow, bad[:, 0].astype(jnp.float32))


def priority_sample(rng, log_a, maskable, budget):
  """Priority sampling of `budget` [B] positions per row: (selected [B, L] bool, log π [B, L]).

  log π_i = min(0, log a_i - log τ) is the conditional inclusion probability of a
  selected position (module docstring); it is 0 (π = 1) when the whole row is kept.
  """
  u = jax.random.uniform(rng, log_a.shape, minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
  log_r = jnp.where(maskable, log_a - jnp.log(u), -jnp.inf)
  order = jnp.argsort(-log_r, axis=1)
  rank = jnp.argsort(order, axis=1)
  selected = (rank < budget[:, None]) & maskable
  sorted_r = jnp.take_along_axis(log_r, order, axis=1)
  idx = jnp.minimum(budget, log_a.shape[1] - 1)[:, None]
  log_tau = jnp.take_along_axis(sorted_r, idx, axis=1)  # the (k+1)-th largest; -inf if k = n
  log_tau = jnp.where(budget[:, None] < log_a.shape[1], log_tau, -jnp.inf)
  log_pi = jnp.minimum(0.0, log_a - log_tau)
  return selected, jnp.where(selected, log_pi, 0.0)


def importance_weights(selected, log_pi, budget, maskable):
  """w_i = (k/n) / π_i at selected positions (0 elsewhere): uniform over proposal inclusion."""
  n = jnp.maximum(jnp.sum(maskable, axis=1, keepdims=True), 1).astype(jnp.float32)
  uniform_pi = budget[:, None].astype(jnp.float32) / n
  return jnp.where(selected, uniform_pi * jnp.exp(-log_pi), 0.0)


def proposal_variance_loss(log_a, selected, log_pi, token_loss, maskable):
  """L_prop = (1/n²) Σ_{i∈S} sg(c_i²/π_i) / a_i, c_i = CE_i / mean_S CE (per row); [B]."""
  sel = selected.astype(jnp.float32)
  mean = jnp.sum(token_loss * sel, 1, keepdims=True) / jnp.maximum(jnp.sum(sel, 1, keepdims=True), 1.0)
  c = jax.lax.stop_gradient(token_loss / jnp.maximum(mean, 1e-6))
  n = jnp.maximum(jnp.sum(maskable, axis=1), 1).astype(jnp.float32)
  coef = jax.lax.stop_gradient(c ** 2 * jnp.exp(-log_pi))
  inv_a = jnp.exp(-jnp.where(selected, log_a, 0.0))
  return jnp.sum(jnp.where(selected, coef * inv_a, 0.0), axis=1) / n ** 2


def build_model(config, vocab_size: int) -> MapnetForPretraining:
  validate(config)
  if config.data.get("packing", "document") == "packed":
    raise NotImplementedError(f"objective {config.objective.name!r} does not pass packed rows' "
                              "position_ids/packing_ids to its model; use data.packing=document or full_sentences")
  cfg = pretraining.encoder_config(config, vocab_size)
  m = config.mapnet
  return MapnetForPretraining(cfg, proposal_cfg=proposal_config(cfg, int(m.proposal_layers),
                                                                int(m.proposal_hidden)))


def _row_keys(seeds):
  return jax.vmap(jax.random.PRNGKey)(seeds)


class Mapnet(pretraining.Objective):
  """config.objective.name = 'mapnet'. Masks come from the proposal, inside the loss (they
  depend on parameters); `prepare` only fixes the per-row budgets k and random seeds."""

  name = "mapnet"

  def __init__(self, config, vocab_size, word_start_table):
    self.num_predictions = masking.max_predictions(config.train.seq_len, config.masking.rate,
                                                   config.masking.get("max_predictions", 0))
    super().__init__(config, vocab_size, word_start_table)

  def build_model(self):
    return build_model(self.config, self.vocab_size)

  def prepare(self, rng, batch):
    ids = batch["input_ids"]
    maskable = ~masking.special_mask(ids)
    return dict(input_ids=ids, segment_ids=batch["segment_ids"], attention_mask=ids != masking.PAD_ID,
                maskable=maskable, budget=masking._budget(ids, self.config.masking.rate,
                                                          cap=self.config.masking.get("max_predictions", 0)),
                seeds=jax.random.bits(rng, (ids.shape[0],), jnp.uint32))

  def denominators(self, prepared):
    return {"num_predictions": jnp.sum(prepared["budget"]).astype(jnp.float32),
            "rows": jnp.float32(prepared["input_ids"].shape[0])}

  def select(self, params, mb, deterministic):
    """Sample the masks: from the proposal when training, uniformly (weights 1) when evaluating."""
    maskable, budget = mb["maskable"], mb["budget"]
    keys = _row_keys(mb["seeds"])
    select_keys, corrupt_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    if deterministic:  # held-out loss under uniform masking: comparable with the other objectives
      scores = jnp.zeros(maskable.shape, jnp.float32)
      prop = proposal_distribution(scores, maskable, 1.0)
    else:
      scores = self.model.apply({"params": params}, mb["input_ids"], mb["segment_ids"],
                                mb["attention_mask"], method=self.model.propose)
      prop = proposal_distribution(scores, maskable, float(self.config.mapnet.uniform_mix))
    sample = lambda key, la, m, k: priority_sample(key, la[None], m[None], k[None])
    selected, log_pi = jax.vmap(sample)(select_keys, jax.lax.stop_gradient(prop.log_a), maskable, budget)
    selected, log_pi = selected[:, 0], log_pi[:, 0]
    weights = importance_weights(selected, log_pi, budget, maskable)
    if deterministic:
      weights = selected.astype(jnp.float32)
    m = self.config.masking
    unit = jnp.where(selected, jnp.arange(selected.shape[1]), -1)
    corrupt = lambda key, ids, u: masking._corrupt(
        key, ids[None], u[None], per_unit=False, vocab_size=self.vocab_size, mask_prob=m.mask_prob,
        random_prob=m.random_prob, mask_id=masking.MASK_ID, num_reserved=masking.NUM_RESERVED)
    masked = jax.vmap(corrupt)(corrupt_keys, mb["input_ids"], unit)
    masked = jax.tree.map(lambda x: x[:, 0], masked)
    return prop, selected, log_pi, weights, masked

  def _predictions(self, params, mb, deterministic):
    """`select`'s masks gathered to the P predicted positions per row, and each one's loss weight
    iw (the importance weight; 1 when evaluating, 0 at padding)."""
    prop, selected, log_pi, weights, masked = self.select(params, mb, deterministic)
    preds = objectives.select_predictions(masked, self.num_predictions)
    iw = jax.lax.stop_gradient(jnp.take_along_axis(weights, preds.positions, axis=1)) * preds.weights
    return prop, selected, log_pi, masked, preds, iw

  def eval_targets(self, prepared):
    """The held-out loss's targets and weights: uniform masks (no parameters needed), every weight 1."""
    _, _, _, _, preds, iw = self._predictions(None, prepared, deterministic=True)
    return preds.targets, iw

  def sums(self, params, mb, rng, deterministic, frozen=None):
    prop, selected, log_pi, masked, preds, iw = self._predictions(params, mb, deterministic)
    outputs = self.model.apply(
        {"params": params}, masked.input_ids, mb["segment_ids"], mb["attention_mask"], preds.positions,
        deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
    logits = outputs["mlm_logits"].astype(jnp.float32)
    V = logits.shape[-1]
    if self.vocab_size < V:
      logits = jnp.where(jnp.arange(V) < self.vocab_size, logits, -1e9)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), preds.targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, -1) == preds.targets).astype(jnp.float32)
    out = {"mlm_loss": jnp.sum(iw * ce), "mlm_correct": jnp.sum(iw * correct),
           "mlm_loss_unweighted": jnp.sum(preds.weights * ce),
           "weight_sum": jnp.sum(iw), "weight_sq_sum": jnp.sum(iw ** 2),
           "proposal_underflow": jnp.sum(prop.underflow), "proposal_fallback_rows": jnp.sum(prop.fallback)}
    if not deterministic:
      # Per-token CE back at sequence positions for the proposal's variance loss.
      token_ce = jnp.zeros(selected.shape, jnp.float32)
      token_ce = token_ce.at[jnp.arange(ce.shape[0])[:, None], preds.positions].add(ce * preds.weights)
      prop_loss = proposal_variance_loss(prop.log_a, selected, log_pi, token_ce, mb["maskable"])
      n = jnp.maximum(jnp.sum(mb["maskable"], axis=1), 1).astype(jnp.float32)
      a = jnp.exp(prop.log_a)
      entropy = -jnp.sum(jnp.where(mb["maskable"], a * prop.log_a, 0.0), axis=1) / jnp.log(jnp.maximum(n, 2.0))
      out.update(proposal_loss=jnp.sum(prop_loss), proposal_entropy=jnp.sum(entropy))
    return out

  def loss(self, sums, den):
    loss = pretraining.per(sums["mlm_loss"], den["num_predictions"])
    if "proposal_loss" in sums:
      loss = loss + float(self.config.mapnet.proposal_weight) * pretraining.per(sums["proposal_loss"], den["rows"])
    return loss

  def metrics(self, sums, den):
    per = pretraining.per
    n, rows = den["num_predictions"], den["rows"]
    out = {"loss": self.loss(sums, den), "mlm_loss": per(sums["mlm_loss"], n),
           "mlm_accuracy": per(sums["mlm_correct"], n),
           # CE of the proposal's picks, unweighted (biased towards hard tokens: for reading only).
           "mlm_loss_unweighted": per(sums["mlm_loss_unweighted"], n),
           # E[Σw] = N_pred; effective sample size share (Σw)²/Σw²/N_pred (1 = uniform).
           "weight_mean": per(sums["weight_sum"], n),
           "weight_ess": per(sums["weight_sum"] ** 2, sums["weight_sq_sum"] * n),
           "proposal_underflow": sums["proposal_underflow"],
           "proposal_fallback_rows": sums["proposal_fallback_rows"]}
    if "proposal_loss" in sums:
      out["proposal_loss"] = per(sums["proposal_loss"], rows)
      out["proposal_entropy"] = per(sums["proposal_entropy"], rows)
    return out

  def eval_metrics(self, sums, den):
    out = self.metrics(sums, den)
    return {"eval/mlm_loss": float(out["mlm_loss"]), "eval/mlm_accuracy": float(out["mlm_accuracy"]),
            "eval/perplexity": float(jnp.exp(jnp.minimum(out["mlm_loss"], 50.0))),
            "eval/num_predictions": float(den["num_predictions"])}

  def log_summary(self, metrics, prefix=""):
    g = lambda k: metrics.get(prefix + k, float("nan"))
    s = f"loss {g('loss'):.3f} | mlm(iw) {g('mlm_loss'):.3f} acc {g('mlm_accuracy'):.3f}"
    if prefix + "proposal_entropy" in metrics:
      s += (f" | proposal H/Hmax {g('proposal_entropy'):.3f} ess {g('weight_ess'):.2f} "
            f"underflow {g('proposal_underflow'):.0f} fallback {g('proposal_fallback_rows'):.0f}")
    return s
