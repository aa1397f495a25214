"""ALBERT (Lan et al. 2020, "ALBERT: A Lite BERT for Self-supervised Learning of Language
Representations", ICLR, arXiv:1909.11942).

Three changes to BERT (§3.1) plus n-gram masking (§4.1):
  * factorized embedding parameterization: tokens embed in E = 128 dimensions,
    projected to H (V·E + E·H parameters instead of V·H) -> model.embedding_size;
  * cross-layer parameter sharing, all parameters by default (Table 4 also has
    shared-attention and shared-FFN) -> model.share_layers = all | attention | ffn;
  * sentence-order prediction instead of NSP: two consecutive segments of one
    document, swapped half of the time (label 1 = swapped) -> objective 'mlm_sop';
  * n-gram masking, n <= 3 whole words with p(n) = (1/n) / Σ_{k=1}^{3} 1/k
    -> masking.scheme = 'ngram', masking.max_ngram = 3; as the released
    create_pretraining_data.py: 80/10/10 per token, at most
    max_predictions_per_seq=20 predictions per sequence.
§4.1 training: batch 4096, LAMB with lr 0.00176, 125,000 steps, sequences of 512
(the paper shortens 10% of inputs; here all are 512), vocabulary 30,000
(SentencePiece). Warmup 3,125 steps then linear decay, as in the released code
(run_pretraining.py). Table 1 sizes: base 12M (L 12, H 768), large 18M (L 24,
H 1024), xlarge 60M (L 24, H 2048), xxlarge 235M (L 12, H 4096, 64 heads, FFN
16384), all with E = 128. The 4096 batch comes from gradient accumulation.

  --config=experiments/albert.py                  ALBERT-base, §4.1 recipe
  --config=experiments/albert.py:large            ALBERT-large
  --config=experiments/albert.py:xlarge / :xxlarge
  --config=experiments/albert.py:share_attention  Table 4's shared-attention variant (E=128)
  --config=experiments/albert.py:share_ffn        Table 4's shared-FFN variant
  --config=experiments/albert.py:not_shared       Table 4's not-shared variant
  --config=experiments/albert.py:tiny             CPU-sized (E=64 < H=128), on the bundled sample
"""

from spanlm.configs import base_config, cpu_tiny, with_preset


def large(c):
  c.model.size = "large"


def xlarge(c):
  c.model.size = "large"
  c.model.hidden_size = 2048
  c.model.num_heads = 16
  c.model.intermediate_size = 8192


def xxlarge(c):
  c.model.size = "base"  # 12 layers
  c.model.hidden_size = 4096
  c.model.num_heads = 64
  c.model.intermediate_size = 16384


def share_attention(c):
  c.model.share_layers = "attention"


def share_ffn(c):
  c.model.share_layers = "ffn"


def not_shared(c):
  c.model.share_layers = "none"


def tiny(c):
  cpu_tiny(c)
  c.model.embedding_size = 64  # E < H, so the factorization and projection are exercised
  c.train.batch_size = 32
  c.train.grad_accum_steps = 2
  c.optimizer.learning_rate = 5e-3  # LAMB's layer-wise trust ratio takes a larger global step
  c.schedule.warmup_steps = 50


def get_config(arg=None):
  c = base_config()
  c.model.size = "base"
  c.model.dtype = "bfloat16"  # compute dtype; fp32 master weights, fp32 logits/loss/softmax
  c.model.embedding_size = 128
  c.model.share_layers = "all"
  c.model.dropout_rate = 0.1
  c.objective.name = "mlm_sop"
  c.masking.scheme = "ngram"
  c.masking.max_ngram = 3
  c.masking.rate = 0.15
  c.masking.max_predictions = 20  # create_pretraining_data.py --max_predictions_per_seq=20
  c.masking.replacement = "uniform"  # vocab_words[rng.randint(...)]: uniform over the vocabulary
  c.data.vocab_size = 30_000
  c.train.num_steps = 125_000
  c.train.batch_size = 4096
  c.train.grad_accum_steps = 16  # 256 sequences per micro-batch; raise it if memory is short
  c.train.seq_len = 512
  c.train.log_every = 100
  c.train.eval_every = 5_000
  c.train.eval_batches = 50
  c.train.checkpoint_every = 5_000
  c.optimizer.name = "lamb"
  c.optimizer.learning_rate = 0.00176
  c.optimizer.weight_decay = 0.01
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.optimizer.bias_correction = False  # lamb_optimizer.py: no bias correction
  c.schedule.name = "warmup_linear"
  c.schedule.warmup_steps = 3_125
  return with_preset(c, arg, {"tiny": tiny, "large": large, "xlarge": xlarge, "xxlarge": xxlarge,
                              "share_attention": share_attention, "share_ffn": share_ffn,
                              "not_shared": not_shared})
