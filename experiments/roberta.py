"""RoBERTa (Liu et al. 2019, "A Robustly Optimized BERT Pretraining Approach", arXiv:1907.11692).

What RoBERTa changes in BERT's recipe, and where it lives here:
  * dynamic masking (§4.1): a fresh mask every step -- masking runs inside the
    jitted step (spanlm/objectives/masking.py), so every run here is dynamic;
  * FULL-SENTENCES inputs without NSP (§4.2, Table 2): rows packed with
    contiguous text that may cross document boundaries (an extra separator
    between documents) -> `data.packing = 'full_sentences'`, objective 'mlm';
  * large batches (§4.3, Table 3: 256 x 1M steps at lr 1e-4 ~ 2K x 125K at 7e-4
    ~ 8K x 31K at 1e-3, equal passes over the data) -> 8K sequences per step,
    reached by gradient accumulation (an exact large-batch step here);
  * Adam β2 = 0.98 for stability at large batch, ε = 1e-6 (§3.1);
  * full-length 512-token sequences throughout (§3.1; no 128-token phase).
Appendix Table 9 (pretraining hyperparameters), base | large: peak lr 6e-4 | 4e-4,
warmup 24k | 30k steps, then linear decay; batch 8K; 500K steps; weight decay
0.01; dropout 0.1; Adam β1 0.9, β2 0.98, ε 1e-6; no gradient clipping.
(The paper's tokenizer is a 50K byte-level BPE; this repo uses its own SentencePiece.)

  --config=experiments/roberta.py           RoBERTa-base, Table 9
  --config=experiments/roberta.py:large     RoBERTa-large, Table 9
  --config=experiments/roberta.py:bsz2k     Table 3's 2K x 125K, lr 7e-4 row (BERT-base on BOOKS+WIKI)
  --config=experiments/roberta.py:tiny      CPU-sized, on the bundled sample
"""

from spanlm.configs import base_config, cpu_tiny, with_preset


def large(c):
  c.model.size = "large"
  c.optimizer.learning_rate = 4e-4
  c.schedule.warmup_steps = 30_000


def bsz2k(c):
  c.train.batch_size = 2048
  c.train.grad_accum_steps = 8
  c.train.num_steps = 125_000
  c.optimizer.learning_rate = 7e-4


def tiny(c):
  cpu_tiny(c)
  c.train.grad_accum_steps = 2  # large batches by accumulation, as in the full recipe
  c.optimizer.grad_clip = 1.0  # a 500-step run at lr 1e-3 is steadier clipped


def get_config(arg=None):
  c = base_config()
  c.model.size = "base"
  c.model.dtype = "bfloat16"  # compute dtype; fp32 master weights, fp32 logits/loss/softmax
  c.model.dropout_rate = 0.1
  c.data.packing = "full_sentences"
  c.objective.name = "mlm"  # no NSP
  c.masking.scheme = "token"
  c.masking.rate = 0.15
  c.train.num_steps = 500_000
  c.train.batch_size = 8192
  c.train.grad_accum_steps = 32  # 256 sequences per micro-batch; raise it if memory is short
  c.train.seq_len = 512
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.eval_batches = 50
  c.train.checkpoint_every = 5_000
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 6e-4
  c.optimizer.weight_decay = 0.01
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.grad_clip = 0.0  # Table 9: no gradient clipping
  c.schedule.name = "warmup_linear"
  c.schedule.warmup_steps = 24_000
  return with_preset(c, arg, {"tiny": tiny, "large": large, "bsz2k": bsz2k})
