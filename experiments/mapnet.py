"""MAPNet (Chen et al., "Variance-reduced language pretraining via a mask proposal
network"): masked positions are sampled from a learned proposal (priority sampling,
k per row without replacement) instead of uniformly, and each predicted token's
loss is importance-weighted by (k/n)/π_i so the gradient stays an unbiased estimate
of the uniform-masking gradient; the proposal network is trained jointly to
minimise the estimator's variance (docs/mapnet.md derives the weights).

Otherwise BERT's recipe (experiments/bert.py): token masking at 15%, 80/10/10.

  --config=experiments/mapnet.py        BERT-base with a 1-layer proposal network
  --config=experiments/mapnet.py:tiny   CPU-sized, on the bundled sample
"""

from spanlm.objectives import mapnet
from spanlm.configs import base_config, cpu_tiny, with_preset


def tiny(c):
  cpu_tiny(c)
  c.train.num_steps = 300
  c.mapnet.proposal_hidden = 32


def get_config(arg=None):
  c = base_config()
  c.model.dtype = "bfloat16"  # compute dtype; fp32 master weights, fp32 logits/loss/softmax
  with c.unlocked():
    c.mapnet = mapnet.default_config()
  c.objective.name = "mapnet"
  c.model.size = "base"
  c.masking.scheme = "token"
  c.masking.rate = 0.15
  c.mapnet.proposal_layers = 1
  c.mapnet.proposal_hidden = 64
  c.mapnet.uniform_mix = 0.1
  c.mapnet.proposal_weight = 1.0
  c.train.num_steps = 1_000_000
  c.train.batch_size = 256
  c.train.seq_len = 512
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.eval_batches = 50
  c.train.checkpoint_every = 10_000
  c.optimizer.learning_rate = 1e-4
  c.schedule.warmup_steps = 10_000
  return with_preset(c, arg, {"tiny": tiny})
