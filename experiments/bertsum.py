"""BERTSUM extractive summarisation (Liu & Lapata 2019, §3.2, §4.1-4.3).

Paper settings (CNN/DailyMail): BERT-base, inputs truncated to 512 tokens,
2 inter-sentence Transformer layers, oracle of up to 3 sentences by greedy
ROUGE-1+2, top-3 selection with trigram blocking, 50,000 steps with gradient
accumulation every 2 steps on 3 GPUs, dropout 0.1, Adam β1 0.9 β2 0.999,
Noam schedules: encoder 2e-3·min(step^-0.5, step·20000^-1.5), new layers
0.1·min(step^-0.5, step·10000^-1.5) (the schedules the paper gives for its
abstractive model's encoder and decoder; separate optimizers here via
optax.multi_transform; `separate_optimizers=False` uses config.optimizer).

  --config=experiments/bertsum.py       full CNN/DM in BertSum's JSON shards:
      --config.data.train_file='bert_data/cnndm.train.*.json'
      --config.data.eval_file='bert_data/cnndm.valid.*.json' --config.init_checkpoint=DIR
  --config=experiments/bertsum.py:smoke the 6-article sample, train = eval (a smoke run, not a result)
"""

from spanlm.configs import with_preset
from spanlm.finetune import finetune_config


def smoke(c):
  c.train.seq_len = 512
  c.train.batch_size = 2
  c.finetune.max_steps = 30
  c.finetune.num_epochs = 10
  c.finetune.eval_batch_size = 2
  c.train.log_every = 5
  c.bertsum.encoder_warmup = 100  # short run: warmups scaled down so the schedules leave zero
  c.bertsum.new_warmup = 50


def get_config(arg=None):
  c = finetune_config("bertsum")  # config.bertsum and data.train_file/eval_file: spanlm/tasks/bertsum.py
  c.task.predict_split = "dev"
  c.train.seq_len = 512
  c.train.batch_size = 32  # documents per step (the paper's code batches by tokens instead)
  c.finetune.max_steps = 50000
  c.finetune.num_epochs = 0
  c.model.dropout_rate = 0.1
  return with_preset(c, arg, {"smoke": smoke})
