"""GLUE fine-tuning (Devlin et al. 2019, §4.1): --config=experiments/glue.py:<task>.

Tasks: cola sst2 mrpc qqp stsb mnli qnli rte wnli. BERT's hyperparameters:
batch 32, 3 epochs, lr 2e-5 (the paper searched {5e-5, 4e-5, 3e-5, 2e-5}),
AdamW with weight decay 0.01, warmup over 10% of the steps then linear decay,
dropout 0.1, sequences of 128 tokens (64 for SST-2's short sentences).

Start from a converted checkpoint or a pretraining workdir:
  python tools/import_checkpoint.py --format=hf --src=HF_DIR --out=/tmp/minilm
  python -m spanlm.main --config=experiments/glue.py:rte --workdir=/tmp/rte \
      --config.init_checkpoint=/tmp/minilm --config.task.data_dir=glue_data/RTE
(`config.task.data_dir` defaults to $GLUE_DIR/<TASK>.)
"""

from spanlm.finetune import finetune_config
from spanlm.tasks.glue import TASKS


def get_config(arg=None):
  if arg not in TASKS:
    raise ValueError(f"pick a GLUE task: --config=experiments/glue.py:<task>, task one of {sorted(TASKS)}")
  c = finetune_config()
  c.task.name = arg
  c.train.seq_len = 64 if arg == "sst2" else 128
  c.train.batch_size = 32
  c.optimizer.learning_rate = 2e-5
  c.finetune.num_epochs = 3
  c.train.log_every = 20
  return c
