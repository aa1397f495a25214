"""ELECTRA's generator and discriminator (Clark et al. 2020, "ELECTRA: Pre-training
Text Encoders as Discriminators Rather Than Generators").

A small masked-LM generator G fills the masked positions of x^masked with
samples x̂_i ~ p_G(x_i | x^masked); the discriminator D, the model kept for
fine-tuning, reads the corrupted sequence x^corrupt and predicts for every
token whether it is the original (replaced-token detection, RTD):

  L_MLM  = E[ Σ_{i∈m} -log p_G(x_i | x^masked) ]
  L_Disc = E[ Σ_{t=1..n} -1(x^corrupt_t = x_t) log D(x^corrupt, t)
                        - 1(x^corrupt_t ≠ x_t) log(1 - D(x^corrupt, t)) ]
  min  L_MLM + λ L_Disc,   λ = 50                                   (§2, eq. 1)

A sampled token equal to the original counts as original. No gradient flows
through the sampling: the samples are token ids (integers), so the discriminator's
loss reaches the shared embeddings but never the generator's own layers, which
learn only from L_MLM (tests/test_electra.py checks both).

Weight sharing (§3.2): generator and discriminator share the token and position
embeddings (the generator being smaller, both read E-dimensional embeddings and
each projects them to its own hidden size when they differ). The generator is
1/4 to 1/3 of the discriminator's hidden size (Fig. 3; "small" uses 1/4) with
heads = hidden/64 and FFN = 4·hidden, the same depth.

Parameter layout: `params['encoder']` is the discriminator, exactly a
`BertEncoder` tree, so fine-tuning (`spanlm.finetune`, init_checkpoint = the
pretraining workdir) and the HF export take the discriminator unchanged;
`params['generator']` and `params['discriminator_head']` are pretraining-only.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from spanlm.models.bert import BertConfig, BertEncoder, EncoderLayer, _zeros, dense, layer_norm
from spanlm.models.heads import gather


def embedding_size(cfg: BertConfig) -> int:
  """The width E of the (shared) embedding tables (H unless factorised, as in ELECTRA-small)."""
  return cfg.embed_dim


def generator_config(disc: BertConfig, fraction: float = 0.25) -> BertConfig:
  """The generator's encoder: `fraction` of the discriminator's width, heads = H/64, FFN = 4H."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"generator hidden-size fraction {fraction} must be in (0, 1]")
  hidden = max(int(round(disc.hidden_size * fraction)), 1)
  heads = max(hidden // 64, 1)
  while hidden % heads:  # keep head_dim integral for odd widths
    heads -= 1
  fields = {f.name: getattr(disc, f.name) for f in dataclasses.fields(disc)}
  fields.update(hidden_size=hidden, num_heads=heads, intermediate_size=4 * hidden, use_pooler=False)
  if "embedding_size" in fields:
    fields["embedding_size"] = None
  if "share_layers" in fields:
    fields["share_layers"] = "none"
  return BertConfig(**fields)


class Generator(nn.Module):
  """A small MLM encoder over the discriminator's embeddings; logits at `positions` [B, P, V]."""

  cfg: BertConfig  # the generator's own size (generator_config)
  embed_dim: int  # width E of the shared embedding tables

  @nn.compact
  def __call__(self, embedded, mask, positions, attend, deterministic: bool):
    cfg = self.cfg
    x = embedded
    if self.embed_dim != cfg.hidden_size:
      x = dense(cfg, cfg.hidden_size, ("embed_in", "embed"), "embeddings_project")(x)
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, name=f"layer_{i}")(x, mask, deterministic)
    # ELECTRA's get_token_logits: ONE Dense to the embedding width E + GELU + LayerNorm,
    # then the tied embedding table and a bias.
    h = dense(cfg, self.embed_dim, ("embed_in", "embed"), "mlm_dense")(gather(x, positions))
    h = layer_norm(cfg, "mlm_norm")(nn.gelu(h, approximate=False))
    bias = self.param("mlm_bias", _zeros(("vocab",)), (cfg.vocab_size,))
    return attend(h) + bias


class ElectraForPretraining(nn.Module):
  """Discriminator (`encoder`, a BertEncoder) + RTD head + generator sharing its embeddings.

  `cfg` is the discriminator's config: `model.cfg` is what fine-tuning reads.
  """

  cfg: BertConfig
  generator_fraction: float = 0.25

  def setup(self):
    self.encoder = BertEncoder(self.cfg)
    self.generator = Generator(generator_config(self.cfg, self.generator_fraction),
                               embed_dim=embedding_size(self.cfg))
    self.head_dense = dense(self.cfg, self.cfg.hidden_size, ("embed_in", "embed"), "discriminator_dense")
    self.head_out = dense(self.cfg, 1, ("embed", None), "discriminator_out")

  def generate(self, input_ids, segment_ids, attention_mask, positions, deterministic: bool = True):
    """Generator MLM logits [B, P, V] at `positions` of the masked input."""
    # The shared tables and their LayerNorm, at width E (not through the discriminator's
    # E -> H projection: each network projects to its own width, as in ELECTRA's code).
    e = self.encoder.embeddings
    pos = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    x = (jnp.take(e.word, input_ids, axis=0) + jnp.take(e.position, pos, axis=0)
         + jnp.take(e.segment, segment_ids, axis=0))
    emb = e.dropout(e.norm(x.astype(self.cfg.dtype)), deterministic=deterministic)
    mask = attention_mask.astype(bool)[:, None, None, :]
    return self.generator(emb, mask, positions, self.encoder.embeddings.attend, deterministic)

  def discriminate(self, input_ids, segment_ids, attention_mask, deterministic: bool = True):
    """Replaced-token logits [B, L] (sigmoid > 0.5 = 'replaced')."""
    hidden = self.encoder(input_ids, segment_ids, attention_mask, deterministic=deterministic)
    if self.cfg.use_pooler:
      hidden = hidden[0]
    h = nn.gelu(self.head_dense(hidden), approximate=False)
    return self.head_out(h)[..., 0].astype(jnp.float32)

  def __call__(self, input_ids, segment_ids, attention_mask, positions, deterministic: bool = True):
    """Both networks on the same input (for init and shape checks)."""
    return {"mlm_logits": self.generate(input_ids, segment_ids, attention_mask, positions, deterministic),
            "rtd_logits": self.discriminate(input_ids, segment_ids, attention_mask, deterministic)}


def sample_replacements(seeds, logits, num_classes: int, num_reserved: int):
  """One token per predicted position from the generator, x̂ ~ softmax(logits) (no gradient).

  seeds: uint32 [B] (one key per row, so micro-batching and sharding do not change the
  draw); logits: [B, P, V]. Vocabulary padding (>= num_classes) and the reserved ids
  ([PAD], [CLS], [SEP], [MASK], ...) are never sampled.
  """
  ids = jnp.arange(logits.shape[-1])
  # stop_gradient as ELECTRA's _get_fake_data; the draw is an integer, so no gradient could pass anyway.
  logits = jnp.where((ids >= num_reserved) & (ids < num_classes),
                     jax.lax.stop_gradient(logits).astype(jnp.float32), -1e9)
  draw = lambda seed, row: jax.random.categorical(jax.random.PRNGKey(seed), row, axis=-1)
  return jax.vmap(draw)(seeds, logits).astype(jnp.int32)


def corrupt(input_ids, positions, weights, sampled):
  """x^corrupt: `sampled` written at the (weighted) predicted positions of `input_ids`."""
  rows = jnp.arange(input_ids.shape[0])[:, None]
  # Padded prediction slots (weight 0) point at position 0 ([CLS]): write the original back.
  current = jnp.take_along_axis(input_ids, positions, axis=1)
  return input_ids.at[rows, positions].set(jnp.where(weights > 0, sampled, current))


def discriminator_params(params) -> dict:
  """The discriminator encoder of an ELECTRA params tree, in BertEncoder's layout."""
  if "generator" not in params or "encoder" not in params:
    raise ValueError("not an ELECTRA params tree: expected top-level 'encoder' and 'generator' "
                     f"keys, got {sorted(params)}")
  return params["encoder"]
