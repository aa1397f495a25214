"""SpanBERT pretrained with LAMB's large-batch recipe (You et al. 2020, "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes", ICLR, arXiv:1904.00962).

The paper's fastest BERT-Large run (Table 1, §4 "mixed-batch training"): 8599
iterations in two phases, like BERT's own 90%/10% split by sequence length:

  phase 1   seq 128, batch 65,536 ("64k"), 7,038 iterations (9/10 of the epochs)
  phase 2   seq 512, batch 32,768 ("32k"), 1,561 iterations (1/10), warmup restarted

LAMB with b1 0.9, b2 0.999, eps 1e-6, weight decay 0.01 (BERT's), LayerNorm and
biases excluded from decay and from the trust ratio (ALBERT's LAMB). Learning
rate: the paper's untuned batch-size sweep (Table 4) uses the square-root
scaling rule eta(B) = 5e-3 * sqrt(B / 32768), linear warmup over 1/5 of the
iterations at 32k, then polynomial decay (power 1, BERT's). Here phase 1 takes
eta(65536) = 7.07e-3 and phase 2 eta(32768) = 5e-3, each warming up for 1/5 of
its steps. The paper's large batches come from 1024 TPUv3 chips; here they come
from gradient accumulation (`train.grad_accum_steps`), which changes nothing in
the update.

  --config=experiments/span_bert_lamb.py          phase 1 at BERT-base size
  --config=experiments/span_bert_lamb.py:phase2   phase 2's settings (a separate run: this
                                                  repo has no phase-1 -> phase-2 warm start yet)
  --config=experiments/span_bert_lamb.py:tiny     CPU-sized: BERT-tiny, batch 256 = 8 x 32 by
                                                  accumulation, on the bundled sample
"""

import math

from spanlm.configs import base_config, cpu_tiny, with_preset

BASE_LR, BASE_BATCH = 5e-3, 32_768  # LAMB Table 4: 5/(2^0 x 10^3) at batch 32k


def sqrt_scaled_lr(batch_size: int, base_lr: float = BASE_LR, base_batch: int = BASE_BATCH) -> float:
  """Square-root LR scaling: eta(B) = eta_0 sqrt(B / B_0) (You et al. 2020, §4)."""
  return base_lr * math.sqrt(batch_size / base_batch)


def _phase(c, seq_len, batch_size, steps, accum):
  c.train.seq_len = seq_len
  c.train.batch_size = batch_size
  c.train.grad_accum_steps = accum
  c.train.num_steps = steps
  c.optimizer.learning_rate = sqrt_scaled_lr(batch_size)
  c.schedule.warmup_steps = steps // 5


def phase2(c):
  _phase(c, seq_len=512, batch_size=32_768, steps=1_561, accum=128)


def tiny(c):
  cpu_tiny(c)
  c.train.batch_size = 256  # a "large" batch for BERT-tiny: 8 accumulated micro-batches of 32
  c.train.grad_accum_steps = 8
  c.train.num_steps = 40  # ~10k sequences: a few minutes on 2 CPU cores
  c.train.log_every = 10
  c.train.eval_every = 0  # held-out loss at the end only
  c.train.checkpoint_every = 40
  c.schedule.warmup_steps = 8  # 1/5 of the steps, as above
  c.optimizer.learning_rate = 5e-2  # BERT-tiny: of 1e-2 and 5e-2 tried, 5e-2 (docs/optimizers.md)


def get_config(arg=None):
  c = base_config()
  c.model.size = "base"
  c.model.dtype = "bfloat16"  # compute dtype; fp32 master weights, fp32 logits/loss/softmax
  c.masking.scheme = "span"
  c.masking.rate = 0.15
  c.masking.geometric_p = 0.2
  c.masking.max_span = 10
  c.objective.sbo = True
  c.train.log_every = 10
  c.train.eval_every = 1_000
  c.train.eval_batches = 50
  c.train.checkpoint_every = 500
  c.optimizer.name = "lamb"
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip = 1.0  # clip the global norm before LAMB, as BERT/NVIDIA's LAMB do
  c.schedule.name = "warmup_poly"
  c.schedule.power = 1.0
  _phase(c, seq_len=128, batch_size=65_536, steps=7_038, accum=64)
  return with_preset(c, arg, {"tiny": tiny, "phase2": phase2})
