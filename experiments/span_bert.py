"""SpanBERT (Joshi et al. 2020): span masking + span boundary objective, no NSP.

Paper settings (§3-4): spans of whole words with length ~ Geo(0.2) truncated at
10 words (mean 3.8), starts uniform, 15% of tokens, one 80/10/10 decision per
span; MLM + SBO losses summed; single 512-token segments (no NSP); BERT-large
in the paper (base here, `:large` for the paper's size); Adam(W) with lr 1e-4,
10k warmup steps then linear decay; batch 256 sequences of 512 tokens.

  --config=experiments/span_bert.py          the paper's recipe at BERT-base size
  --config=experiments/span_bert.py:large    ... at BERT-large size, as in the paper
  --config=experiments/span_bert.py:tiny     a CPU-sized run on the bundled sample (~2 min)
"""

from spanlm.configs import base_config, cpu_tiny, with_preset


def large(c):
  c.model.size = "large"


def get_config(arg=None):
  c = base_config()
  c.model.size = "base"
  c.model.dtype = "bfloat16"  # compute dtype; fp32 master weights, fp32 logits/loss/softmax
  c.masking.scheme = "span"
  c.masking.rate = 0.15
  c.masking.geometric_p = 0.2
  c.masking.max_span = 10
  c.objective.sbo = True
  c.train.num_steps = 2_400_000
  c.train.batch_size = 256
  c.train.seq_len = 512
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.eval_batches = 50
  c.train.checkpoint_every = 10_000
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.weight_decay = 0.01
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.schedule.name = "warmup_linear"
  c.schedule.warmup_steps = 10_000
  return with_preset(c, arg, {"tiny": cpu_tiny, "large": large})
