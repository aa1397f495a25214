r"""Smith's learning-rate range test on the configured model and data.

  python tools/lr_range_test.py --out=/tmp/lr_range
  python tools/lr_range_test.py --config=experiments/span_bert.py:tiny \
      --config.train.num_steps=200 --min_lr=1e-6 --max_lr=1 --out=/tmp/lr_range

Builds the real spanlm.train.Trainer (model, masking, loss, optimizer of the
config) with the learning rate replaced by an exponential ramp from --min_lr to
--max_lr over config.train.num_steps steps, records the per-step loss, stops
once the smoothed loss exceeds --divergence x its best, and writes
OUT/lr_range.json {lrs, losses, smoothed, suggested_min_lr, suggested_max_lr,
min_loss_lr, steepest_lr, overrides} and OUT/lr_range.png. It prints the
--config overrides that train with a cyclical schedule (--schedule) over the
suggested range; paste them after a spanlm.main command line.
See spanlm/optim/lr_range.py for the method.
"""

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from spanlm import parallel
from spanlm.optim import lr_range
from spanlm.train import Trainer

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "lr_range_test.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Experiment file[:preset].", lock_config=True)
_OUT = flags.DEFINE_string("out", "lr_range", "Output directory (also holds the prepared data).")
_MIN_LR = flags.DEFINE_float("min_lr", 1e-6, "First learning rate of the ramp.")
_MAX_LR = flags.DEFINE_float("max_lr", 1.0, "Last learning rate of the ramp.")
_BETA = flags.DEFINE_float("beta", 0.9, "Loss smoothing: EMA coefficient (window ~1/(1-beta) steps).")
_DIVERGENCE = flags.DEFINE_float("divergence", 4.0, "Stop when smoothed loss > this x best "
                                  "(or back above its start after falling; see spanlm/optim/lr_range.py).")
_SCHEDULE = flags.DEFINE_enum("schedule", "triangular", ["triangular", "triangular2", "exp_range", "onecycle"],
                              "Cyclical schedule the printed overrides select.")


def main(argv):
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # JAX, TFDS and Orbax INFO lines only at --verbosity=1
  del argv
  from spanlm import workdir as workdir_lib
  from spanlm.data import pipeline

  config = _CONFIG.value
  t = config.train
  lrs = lr_range.exponential_lrs(_MIN_LR.value, _MAX_LR.value, t.num_steps)
  wd = workdir_lib.Workdir(_OUT.value)
  wd.check_writable()
  dataset, tokenizer = wd.prepare_data(config)  # the config's own packing and vocabulary
  out = str(wd.root)
  mesh = parallel.make_mesh(config.mesh)
  trainer = Trainer(config, tokenizer.vocab_size, tokenizer.word_start_table(), mesh,
                    optimizer=lr_range.ramp_optimizer(config, lrs))
  batches = pipeline.train_iterator(dataset.train, global_batch_size=t.batch_size, seed=config.seed)
  state = trainer.init_state()

  def step(i, lr):
    nonlocal state
    state, metrics = trainer.train_step(state, parallel.global_batch(next(batches), mesh))
    del i, lr  # the ramp is inside the optimizer: step i runs at lrs[i]
    return jax.device_get(metrics["loss"])

  result = lr_range.run(step, lrs, beta=_BETA.value, factor=_DIVERGENCE.value, log=logging.info)
  result["overrides"] = lr_range.schedule_overrides(result, _SCHEDULE.value)
  result["config"] = {"model": config.model.size, "optimizer": config.optimizer.name,
                      "batch_size": t.batch_size, "seq_len": t.seq_len}
  (wd.root / "lr_range.json").write_text(json.dumps(result, indent=1))
  lr_range.plot(result, wd.root / "lr_range.png",
                title=f"LR range test: BERT-{config.model.size}, {config.optimizer.name}, "
                      f"batch {t.batch_size}x{t.seq_len}")
  print(f"{len(result['losses'])} steps, lr {lrs[0]:.1e} -> {result['lrs'][-1]:.1e}"
        f"{' (stopped: loss diverged)' if result['diverged'] else ''}")
  print(f"lowest smoothed loss {min(result['smoothed']):.3f} at lr {result['min_loss_lr']:.2e}; "
        f"steepest descent at lr {result['steepest_lr']:.2e}")
  print(f"suggested range: [{result['suggested_min_lr']:.2e}, {result['suggested_max_lr']:.2e}]")
  print("cyclical schedule over it:", " ".join(result["overrides"]))
  print(f"wrote {out}/lr_range.json and {out}/lr_range.png")


if __name__ == "__main__":
  app.run(main)
