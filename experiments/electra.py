"""ELECTRA (Clark et al. 2020): replaced-token detection with a small MLM generator.

Paper settings (Table 6-7, App. A): ELECTRA-Small: discriminator 12 layers,
H 256, 4 heads, FFN 1024, embeddings E 128 (projected to H), 14M parameters;
generator 1/4 of the discriminator's width (same depth, heads = H/64, FFN = 4H),
sharing the token and position embeddings; 15% of tokens masked, replaced by
[MASK] 85% of the time and kept 15% (google-research/electra pretrain_helpers.mask;
§2 writes all [MASK]); generator head Dense(E) + GELU + LayerNorm into the tied
embeddings (run_pretraining.get_token_logits); L = L_MLM + 50 L_Disc; Adam lr 5e-4, β1 0.9, β2 0.999, ε 1e-6,
weight decay 0.01, 10k warmup steps then linear decay, dropout 0.1, batch 128
sequences of 128, 1M steps. ELECTRA-Base: H 768 (E = H), generator 1/3,
lr 2e-4, batch 256 sequences of 512, 766k steps.

The discriminator is `params['encoder']`: fine-tune it with
`--config.init_checkpoint=<this workdir>` (spanlm/finetune.py) or export it.

  --config=experiments/electra.py        ELECTRA-Small (the paper's 14M discriminator)
  --config=experiments/electra.py:base   ELECTRA-Base
  --config=experiments/electra.py:tiny   CPU-sized (BERT-tiny discriminator), bundled sample
"""

from spanlm.objectives import electra
from spanlm.configs import base_config, cpu_tiny, with_preset


def base(c):
  c.model.size = "base"
  c.model.num_layers = c.model.hidden_size = c.model.num_heads = c.model.intermediate_size = None
  c.model.embedding_size = None
  c.electra.generator_fraction = 1 / 3
  c.optimizer.learning_rate = 2e-4
  c.train.batch_size = 256
  c.train.seq_len = 512
  c.train.num_steps = 766_000


def tiny(c):
  cpu_tiny(c)
  c.model.num_layers = c.model.hidden_size = c.model.num_heads = c.model.intermediate_size = None
  c.model.embedding_size = None
  c.train.num_steps = 300
  c.optimizer.learning_rate = 1e-3


def get_config(arg=None):
  c = base_config()
  c.model.dtype = "bfloat16"  # compute dtype; fp32 master weights, fp32 logits/loss/softmax
  with c.unlocked():
    c.electra = electra.default_config()
  c.objective.name = "electra"
  c.model.size = "base"  # ELECTRA-Small: the base depth with the widths below
  c.model.num_layers = 12
  c.model.hidden_size = 256
  c.model.num_heads = 4
  c.model.intermediate_size = 1024
  c.model.embedding_size = 128
  c.model.dropout_rate = 0.1
  c.electra.generator_fraction = 0.25
  c.electra.disc_weight = 50.0
  c.masking.scheme = "token"
  c.masking.rate = 0.15
  c.masking.mask_prob = 0.85  # pretrain_helpers.mask: 85% of m get [MASK], 15% stay (§2 says
  c.masking.random_prob = 0.0  # REPLACE(x, m, [MASK]); the released code keeps 15%; no random)
  c.train.num_steps = 1_000_000
  c.train.batch_size = 128
  c.train.seq_len = 128
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.eval_batches = 50
  c.train.checkpoint_every = 10_000
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 5e-4
  c.optimizer.weight_decay = 0.01
  c.optimizer.eps = 1e-6
  c.optimizer.bias_correction = False  # AdamWeightDecayOptimizer: no bias correction
  c.schedule.name = "linear"
  c.schedule.warmup_steps = 10_000
  return with_preset(c, arg, {"base": base, "tiny": tiny})
