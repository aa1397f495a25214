r"""Plots train and held-out loss and accuracy, against step and against tokens, for one or more runs.

  python tools/plot_metrics.py /tmp/spanlm_tiny [/tmp/other_run ...] --out=curves.png

Each WORKDIR is a run directory with metrics.jsonl (and config.json, for tokens per step). Every
pretraining run also writes WORKDIR/curves.png itself when it ends.
"""
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_OUT = flags.DEFINE_string("out", "curves.png", "Output PNG.")
_LABELS = flags.DEFINE_list("labels", None, "Legend names, one per WORKDIR (default: folder names).")


def main(argv):
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # JAX, TFDS and Orbax INFO lines only at --verbosity=1
  from spanlm import paths
  from spanlm.metrics import plot_curves
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("give at least one WORKDIR: python tools/plot_metrics.py WORKDIR [...] --out=curves.png")
  for w in workdirs:
    if not paths.is_file(paths.path(w) / "metrics.jsonl"):  # local or gs://
      print(f"error: {w} has no metrics.jsonl; is it a spanlm run directory?", file=sys.stderr)
      sys.exit(2)
  if _LABELS.value and len(_LABELS.value) != len(workdirs):
    print(f"error: --labels has {len(_LABELS.value)} names for {len(workdirs)} workdirs", file=sys.stderr)
    sys.exit(2)
  out = plot_curves(workdirs, _OUT.value, _LABELS.value)
  print(f"wrote {out}" if out else "matplotlib is not installed: pip install matplotlib")


if __name__ == "__main__":
  app.run(main)
