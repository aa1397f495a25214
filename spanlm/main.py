"""Command line: python -m spanlm.main --config=experiments/span_bert.py:tiny --workdir=DIR

Flags `--config.a.b=value` override any config field; an unknown field is an
error. Multi-host runs use JAX's own runtime: on Cloud TPU and SLURM
`jax.distributed.initialize()` finds its peers itself; elsewhere pass
--coordinator_address, --num_processes and --process_id.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. experiments/span_bert.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and prepared data.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with "
                                 "auto-detection (Cloud TPU pods, SLURM).")

_BIG_SIZES = ("medium", "base", "large")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def main(argv):
  del argv
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()
  import jax  # after flag parsing, so --help is instant

  if _COORDINATOR.value or _DISTRIBUTED.value:
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
      # CPU processes need a collectives backend to talk to each other (tests/test_multihost.py).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  config = _CONFIG.value
  # Fine-tuning takes its size from config.init_checkpoint, not config.model.size.
  if jax.default_backend() == "cpu" and config.model.size in _BIG_SIZES and not config.get("init_checkpoint"):
    logging.warning(
        "No accelerator found (JAX backend: cpu) and this is the full recipe (BERT-%s, batch %d x "
        "%d tokens): it runs, but very slowly. For a CPU-sized run use the :tiny preset, e.g. "
        "--config=experiments/span_bert.py:tiny", config.model.size, config.train.batch_size,
        config.train.seq_len)
  from spanlm import train

  if "task" in config and config.task.name:  # fine-tuning configs (spanlm.finetune.finetune_config)
    from spanlm import finetune
    result = finetune.run(config, _WORKDIR.value)
  else:
    result = train.train_and_evaluate(config, _WORKDIR.value)
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)


def _raised_here(e: BaseException) -> bool:
  """True if the innermost frame of `e` is spanlm's own code: a deliberate, explained error."""
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR)


def _unknown_override(e: AttributeError) -> str | None:
  """The --config.* flag whose last field is the one ml_collections could not find, if any."""
  for arg in sys.argv[1:]:
    if arg.startswith("--config."):
      field = arg.split("=", 1)[0].rsplit(".", 1)[-1]
      if re.search(rf"\b{re.escape(field)}\b", str(e)):
        return arg.split("=", 1)[0]
  return None


def _missing_config_file(argv: list[str]) -> str | None:
  """The --config file named on the command line, if it does not exist (checked before absl parses)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    path = value.partition(":")[0]
    return None if os.path.isfile(path) else path
  return None


def run():
  flags.mark_flags_as_required(["config", "workdir"])
  missing = _missing_config_file(sys.argv[1:])
  if missing:
    print(f"error: --config file {missing!r} not found (relative to the current directory {os.getcwd()}); "
          f"run from the repository root or pass an absolute path, e.g. "
          f"--config=experiments/span_bert.py:tiny", file=sys.stderr)
    sys.exit(2)
  try:
    app.run(main)
  except AttributeError as e:
    arg = _unknown_override(e)
    if arg is None:
      raise
    hint = re.search(r"Did you mean [^?]*\?", str(e))
    print(f"error: {arg} names a config field that does not exist. {hint.group(0) if hint else ''} "
          f"The fields are listed in spanlm/configs.py.", file=sys.stderr)
    sys.exit(2)
  except (ValueError, FileNotFoundError) as e:
    if not _raised_here(e):
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
