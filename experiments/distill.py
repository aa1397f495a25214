"""Distillation of a pretrained spanlm MLM teacher (DistilBERT, Sanh et al. 2019; TinyBERT,
Jiao et al. 2020): soft-target MLM (T² · KL), hidden-state MSE through a learned
projection and attention-map MSE through the uniform layer mapping g(m) = m·N/M.

DistilBERT (Hugging Face distiller.py / train.py defaults): the student is BERT-base
with half the layers (6), initialised from the teacher's embeddings, MLM head and
layers [0, 2, 4, 7, 9, 11]; T = 2; soft targets on every token; losses 5·L_ce +
2·L_mlm + 1·L_cos; masked tokens chosen with mlm_smoothing 0.7; Adam lr 5e-4,
eps 1e-6, no weight decay, clip-norm 5, 5% warmup; batch 4000 (accumulation).
`:tinybert`: TinyBERT-4's general distillation (4 layers, H 312, FFN 1200, 12 heads,
from scratch): hidden-state and pre-softmax attention-score MSEs summed over the
mapped layers, no soft or hard MLM term. docs/fidelity.md has the table.

The teacher is a pretraining workdir (its config.json + latest checkpoint); the
student must use the teacher's tokenizer (a different vocabulary is an error):

  --config=experiments/distill.py --config.distill.teacher_workdir=/runs/bert_base
  --config=experiments/distill.py:tiny --config.distill.teacher_workdir=/tmp/bert_tiny
      (a 1-layer, H 64 student of experiments/bert.py:tiny on the bundled sample)
"""

from spanlm.objectives import distill
from spanlm.configs import base_config, cpu_tiny, with_preset


def tinybert(c):
  c.model.size = "base"
  c.model.num_layers = 4
  c.model.hidden_size = 312
  c.model.num_heads = 12
  c.model.intermediate_size = 1200
  c.distill.init_from_teacher = False
  c.distill.soft_weight = c.distill.hard_weight = c.distill.cosine_weight = 0.0
  c.distill.hidden_weight = c.distill.attention_weight = 1.0  # general_distill.py: rep + att
  c.masking.smoothing = 0.0


def tiny(c):
  cpu_tiny(c)
  c.model.num_layers = 1
  c.model.hidden_size = 64  # != the teacher's 128: exercises the learned projection W_h
  c.model.num_heads = 1
  c.model.intermediate_size = 256
  c.train.num_steps = 300
  c.distill.init_from_teacher = False  # H 64 here, the teacher's 128: nothing to copy
  c.distill.hidden_weight = c.distill.attention_weight = 1.0  # exercise every term (W_h included)


def get_config(arg=None):
  c = base_config()
  c.model.dtype = "bfloat16"  # compute dtype; fp32 master weights, fp32 logits/loss/softmax
  with c.unlocked():
    c.distill = distill.default_config()
  c.objective.name = "distill"
  c.model.size = "base"
  c.model.num_layers = 6  # DistilBERT: half of the teacher's 12
  c.distill.temperature = 2.0
  c.distill.soft_weight = 5.0  # DistilBERT's α_ce : α_mlm : α_cos = 5 : 2 : 1
  c.distill.soft_targets = "all"  # restrict_ce_to_mask=False
  c.distill.hard_weight = 2.0
  c.distill.cosine_weight = 1.0
  c.distill.hidden_weight = 0.0  # TinyBERT's terms: off in DistilBERT (on in :tinybert)
  c.distill.attention_weight = 0.0
  c.distill.init_from_teacher = True  # extract_distilbert.py: every other teacher layer
  c.masking.scheme = "token"
  c.masking.smoothing = 0.7  # mlm_smoothing
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 5.0
  c.train.num_steps = 100_000
  c.train.batch_size = 256
  c.train.seq_len = 512
  c.train.log_every = 100
  c.train.eval_every = 5_000
  c.train.checkpoint_every = 5_000
  c.optimizer.learning_rate = 5e-4
  c.schedule.warmup_steps = 5_000
  return with_preset(c, arg, {"tiny": tiny, "tinybert": tinybert})
