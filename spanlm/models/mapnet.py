"""MAPNet's models (objectives/mapnet.py holds the estimator and the objective): the
proposal network that scores every position, and the MLM model that carries it.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from spanlm.models.bert import BertConfig, BertEncoder, config_for, dense
from spanlm.models.heads import BertForPretraining


def proposal_config(main: BertConfig, layers: int, hidden: int) -> BertConfig:
  return config_for("tiny", vocab_size=main.vocab_size, num_layers=layers, hidden_size=hidden,
                    num_heads=max(hidden // 64, 1), intermediate_size=4 * hidden,
                    max_position_embeddings=main.max_position_embeddings,
                    dropout_rate=0.0, dtype=main.dtype, attention_impl=main.attention_impl)


class ProposalNetwork(nn.Module):
  """A small encoder over the clean tokens -> one score per position [B, L]."""

  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids, segment_ids, attention_mask):
    h = BertEncoder(self.cfg, name="encoder")(input_ids, segment_ids, attention_mask, deterministic=True)
    return dense(self.cfg, 1, ("embed", None), "score")(h)[..., 0].astype(jnp.float32)


class MapnetForPretraining(BertForPretraining):
  """BertForPretraining (params 'encoder', 'mlm_*' as usual) + a 'proposal' network."""

  proposal_cfg: BertConfig | None = None

  def setup(self):
    super().setup()
    self.proposal = ProposalNetwork(self.proposal_cfg)

  def propose(self, input_ids, segment_ids, attention_mask):
    return self.proposal(input_ids, segment_ids, attention_mask)

  def __call__(self, input_ids, segment_ids, attention_mask, positions, *args, **kwargs):
    out = super().__call__(input_ids, segment_ids, attention_mask, positions, *args, **kwargs)
    out["proposal_scores"] = self.propose(input_ids, segment_ids, attention_mask)
    return out
