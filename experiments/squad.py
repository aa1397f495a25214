"""SQuAD fine-tuning (Devlin et al. 2019, §4.2 v1.1 and §4.3 v2.0).

Paper settings: lr 5e-5 (v1.1) / 5e-5 (v2.0), batch 32, 3 epochs (v1.1) / 2
epochs (v2.0), max_seq_len 384, doc_stride 128, max_query_len 64,
max_answer_length 30, 20-best; v2.0 adds the null score and a dev-tuned
threshold. AdamW with 10% linear warmup then linear decay (spanlm.finetune).

  --config=experiments/squad.py:v1      official files: set config.data.train_file / eval_file
  --config=experiments/squad.py:v2      ... for v2.0
  --config=experiments/squad.py:v1_dev_split
      train and evaluate on one file split by article (80/20 by sha1(title),
      `squad.split_articles`), e.g. the SQuAD v1.1 dev set alone:
      --config.data.train_file=/path/dev-v1.1.json --config.init_checkpoint=/tmp/minilm
  --config=experiments/squad.py:v2_dev_split   the same for v2.0
  --config=experiments/squad.py:cpu     v1_dev_split sized for a 2-core CPU (seq 256, capped steps/eval)
"""

from spanlm.configs import with_preset
from spanlm.finetune import finetune_config


def v1(c):
  c.squad.version = "1.1"
  c.finetune.num_epochs = 3


def v2(c):
  c.squad.version = "2.0"
  c.finetune.num_epochs = 2


def v1_dev_split(c):
  v1(c)
  c.squad.split_by_article = True


def v2_dev_split(c):
  v2(c)
  c.squad.split_by_article = True


def cpu(c):
  """What fits a shared 2-core CPU in ~30 min: seq 256, batch 8, 120 steps, 300 held-out questions."""
  v1_dev_split(c)
  c.train.seq_len = 256
  c.train.batch_size = 8
  c.finetune.max_steps = 120
  c.finetune.num_epochs = 1
  c.finetune.eval_batch_size = 16
  c.task.eval_split = ""  # no model selection: the final params predict the held-out articles once
  c.squad.max_eval_examples = 300  # the first 300 questions of the held-out articles
  c.optimizer.learning_rate = 1e-4  # few steps: a larger step than the paper's 5e-5
  c.train.log_every = 10


def get_config(arg=None):
  c = finetune_config("squad")  # config.squad and data.train_file/eval_file: spanlm/tasks/squad.py
  c.task.predict_split = "dev"  # writes predictions.json / nbest.json (and null_odds.json for v2.0)
  c.train.seq_len = 384
  c.train.batch_size = 32
  c.optimizer.learning_rate = 5e-5
  c.finetune.warmup_fraction = 0.1
  return with_preset(c, arg, {"v1": v1, "v2": v2, "v1_dev_split": v1_dev_split,
                              "v2_dev_split": v2_dev_split, "cpu": cpu})
