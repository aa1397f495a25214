"""BERT masked-LM baseline (Devlin et al. 2019): token masking, no span objective.

Paper settings (§3.1, A.2): 15% of WordPiece tokens predicted, 80% [MASK] /
10% random / 10% unchanged; Adam lr 1e-4, β1 0.9, β2 0.999, L2 weight decay
0.01, 10k warmup steps then linear decay; dropout 0.1; GELU; 1M steps of 256
sequences, 90% of them at length 128 (the single-length recipe here uses 512).
NSP is not part of this baseline; `:nsp` is the paper's original MLM+NSP recipe.

Original MLM + next sentence prediction (§3.1 Task #2, A.2): L = mean MLM loss +
mean NSP loss; 50% IsNext / 50% NotNext pairs (built on device from the rows of
the batch, spanlm/objectives/pairs.py); 1M steps of 256 sequences, the first 90% at length
128 and the last 10% at 512; lr 1e-4, warmup 10k, linear decay, wd 0.01.

  --config=experiments/bert.py:tiny         CPU-sized, on the bundled sample
  --config=experiments/bert.py:wwm          whole-word masking variant
  --config=experiments/bert.py:nsp          MLM+NSP, phase 1 (seq 128, stops at step 900k)
  --config=experiments/bert.py:nsp_512      MLM+NSP, phase 2 (seq 512, steps 900k-1M): run it
                                            with phase 1's --workdir to resume from its
                                            checkpoint (the state does not depend on seq_len;
                                            the data is re-prepared at 512)
  --config=experiments/bert.py:nsp_tiny     MLM+NSP on the bundled sample (CPU)
"""

from spanlm.configs import base_config, cpu_tiny, with_preset


def wwm(c):
  c.masking.scheme = "whole_word"


def nsp(c):
  c.objective.name = "mlm_nsp"
  c.train.seq_len = 128
  c.train.stop_at_step = 900_000  # 90% of the 1M steps at length 128


def nsp_512(c):
  c.objective.name = "mlm_nsp"
  c.train.seq_len = 512


def nsp_tiny(c):
  cpu_tiny(c)
  c.objective.name = "mlm_nsp"


def get_config(arg=None):
  c = base_config()
  c.model.size = "base"
  c.model.dtype = "bfloat16"  # compute dtype; fp32 master weights, fp32 logits/loss/softmax
  c.masking.scheme = "token"
  c.masking.rate = 0.15
  c.objective.sbo = False
  c.train.num_steps = 1_000_000
  c.train.batch_size = 256
  c.train.seq_len = 512
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.eval_batches = 50
  c.train.checkpoint_every = 10_000
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.weight_decay = 0.01
  c.optimizer.eps = 1e-6
  c.optimizer.bias_correction = False  # AdamWeightDecayOptimizer: no bias correction
  c.schedule.name = "warmup_linear"
  c.schedule.warmup_steps = 10_000
  return with_preset(c, arg, {"tiny": cpu_tiny, "wwm": wwm, "nsp": nsp, "nsp_512": nsp_512,
                              "nsp_tiny": nsp_tiny})
