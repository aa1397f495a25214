"""SpanBERT (Joshi et al. 2020): span masking + span boundary objective, no NSP.

Paper settings (§3-4) and the paper's command (facebookresearch/SpanBERT
pretraining/README.md): spans of whole words with length ~ Geo(0.2) truncated at
10 words (mean 3.8), anchors uniform over tokens, overlapping and touching spans
merged, 15% of tokens (ceil), one 80/10/10 decision per merged span
(--replacement-method span) with random tokens from the corpus's token stream;
SBO on the first 15 tokens of each span not touching the block's edges
(--max-pair-targets 15), 200-wide target-position embeddings; MLM and SBO each
normalised by their own target count; single 512-token segments (no NSP);
BERT-large in the paper (base here, `:large` for the paper's size); Adam(W) with
lr 1e-4, eps 1e-8, weight decay 0.01, clip-norm 1.0, 10k warmup steps then
linear decay; batch 256 sequences of 512 tokens. docs/fidelity.md has the table.

  --config=experiments/span_bert.py          the paper's recipe at BERT-base size
  --config=experiments/span_bert.py:large    ... at BERT-large size, as in the paper
  --config=experiments/span_bert.py:tiny     a CPU-sized run on the bundled sample (~4.6 min on 2 cores)
"""

from spanlm.configs import base_config, cpu_tiny, with_preset


def large(c):
  c.model.size = "large"


def tiny(c):
  """BERT-tiny on the bundled sample, on 2 CPU cores, learning to use context (README, quick start).

  1000 steps of 16 × 128 tokens (2M tokens). Seed 0 ends 9.4% below the unigram baseline, seeds 1
  and 2 6.6% and 7.6% (the spanbert claim's span+SBO arm). What got seed 0 from 5.8% to 9.4% below the unigram
  baseline (issue 15; held-out rows, each run alone on 2 idle cores unless said):
  - the MLM/SBO output biases start at the training rows' log unigram frequencies
    (`model.output_bias_init=unigram`, docs/fidelity.md), which is what lets it take lr 3e-3: with
    zero biases lr 3e-3 (β2 0.98) was 0.4% *above* the baseline at step 500, with them 7.4% below;
  - lr 3e-3 with β2 0.98 and 100 warmup steps (lr 1e-3: 7.2% at the end; 2e-3: 9.0%; 5e-3: 8.9%);
  - 4 heads of 32 instead of 2 of 64 (same cost; 9.7% against 9.4%, runs sharing the cores).
  Tried and not better at equal tokens: 2000 × 8 rows (zero biases), 1100 × 8 × 128 and
  1100 × 16 × 64 rows (6.3% and 7.7% at step 800). The run takes about 4.6 minutes on 2 idle
  cores (~250 ms a step; the SBO head is a third of it), not the issue's 3.
  """
  cpu_tiny(c)
  c.model.num_heads = 4
  c.model.output_bias_init = "unigram"
  c.train.batch_size = 16
  c.train.num_steps = 1000
  c.train.eval_every = 100
  c.train.eval_batches = 0  # the whole held-out split (92 rows)
  c.train.checkpoint_every = 500
  c.optimizer.learning_rate = 3e-3
  c.optimizer.b2 = 0.98
  c.schedule.warmup_steps = 100


def get_config(arg=None):
  c = base_config()
  c.model.size = "base"
  c.model.dtype = "bfloat16"  # compute dtype; fp32 master weights, fp32 logits/loss/softmax
  c.masking.scheme = "span"
  c.masking.rate = 0.15
  c.masking.geometric_p = 0.2
  c.masking.max_span = 10
  c.masking.replacement = "unigram"  # np.random.choice(tokens): the corpus's token stream
  c.objective.sbo = True
  c.objective.sbo_weight = 1.0  # --pair-loss-weight 1.0
  c.objective.sbo_max_targets = 15  # --max-pair-targets 15
  c.objective.sbo_position_size = 200  # --pair-positional-embedding-size 200
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
  c.optimizer.eps = 1e-8  # --adam-eps 1e-8
  c.optimizer.grad_clip = 1.0  # --clip-norm 1.0
  c.schedule.name = "warmup_linear"
  c.schedule.warmup_steps = 10_000
  return with_preset(c, arg, {"tiny": tiny, "large": large})
