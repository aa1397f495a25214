r"""Elastic weight consolidation, step 1: the diagonal Fisher of task A at its final parameters.

  python -m spanlm.main --config=experiments/span_bert.py:tiny --workdir=/tmp/task_a \
      --config.data.corpus='books_a/*.txt'
  python tools/compute_fisher.py --config=experiments/span_bert.py:tiny --workdir=/tmp/task_a \
      --config.data.corpus='books_a/*.txt' --num_examples=1024
  python -m spanlm.main --config=experiments/span_bert.py:tiny --workdir=/tmp/task_b \
      --config.data.corpus='books_b/*.txt' --config.ewc.fisher_path=/tmp/task_a/ewc/fisher.npz \
      --config.ewc.lambda_=100 --config.ewc.init_from_theta=True

Restores the latest checkpoint of --workdir (same config as task A's run),
computes F = E_n[(d loss_n / d theta)^2] over the first --num_examples rows of
task A's training split from per-example gradients (jax.vmap of jax.grad; one
example = one sequence), and writes WORKDIR/ewc/fisher.npz (arrays
fisher/<param path> and theta/<param path>, see spanlm/optim/ewc.py) plus
WORKDIR/ewc/fisher.json (a summary).
"""

from absl import app, flags
from ml_collections import config_flags

from spanlm import fisher

_CONFIG = config_flags.DEFINE_config_file("config", None, "Task A's experiment file[:preset].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Task A's workdir (checkpoints/ and prepared data).")
_NUM = flags.DEFINE_integer("num_examples", 1024, "Training rows of task A to average over.")
_CHUNK = flags.DEFINE_integer("chunk", 16, "Rows per vmap (memory: chunk x parameters floats).")
_OUT = flags.DEFINE_string("out", "", "Output .npz (default WORKDIR/ewc/fisher.npz).")


def main(argv):
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # JAX, TFDS and Orbax INFO lines only at --verbosity=1
  del argv
  if _NUM.value < 1 or _CHUNK.value < 1:
    raise app.UsageError("--num_examples and --chunk must be positive")
  try:
    summary = fisher.compute_for_workdir(_CONFIG.value, _WORKDIR.value or "", _NUM.value, _CHUNK.value,
                                      _OUT.value or None)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  print(f"Fisher of step {summary['checkpoint_step']} over {summary['num_examples']} examples in "
        f"{summary['seconds']:.1f}s: mean {summary['fisher_mean']:.3e}, median {summary['fisher_median']:.3e}, "
        f"max {summary['fisher_max']:.3e} over {summary['num_params']} params")
  print(f"wrote {summary['file']}; train task B with --config.ewc.fisher_path={summary['file']} "
        "--config.ewc.lambda_=LAMBDA --config.ewc.init_from_theta=True")


if __name__ == "__main__":
  app.run(main)
