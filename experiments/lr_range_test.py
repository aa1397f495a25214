"""The LR range test's default run (Smith 2017, §3.3): BERT-tiny on the bundled sample.

  python tools/lr_range_test.py --out=/tmp/lr_range     (uses this file)
  python tools/lr_range_test.py --config=experiments/span_bert.py:tiny --out=DIR

The test takes `config.train.num_steps` steps with the learning rate growing
exponentially from --min_lr to --max_lr (flags of the tool); everything else
(model, masking, optimizer, batch) is what training would use. No warmup: the
ramp itself starts the run gently.
"""

from spanlm.configs import base_config, cpu_tiny


def get_config(arg=None):
  del arg
  c = base_config()
  cpu_tiny(c)  # BERT-tiny, batch 32 x 128 tokens, AdamW, on the bundled sample
  c.train.num_steps = 300  # steps of the exponential ramp (fewer if the loss diverges first)
  c.schedule.warmup_steps = 0
  return c
