"""Reproduce one paper claim in small: `python tools/reproduce.py --claim=NAME --out=DIR`.

Writes DIR/report.md (claim, the paper's figure it mirrors, settings, means ± std over seeds,
verdict) and DIR/*.png. Claims and their verdict rules: spanlm/repro/, docs/reproductions.md.
"""

from absl import app, flags

from spanlm import repro

_CLAIM = flags.DEFINE_string("claim", None, f"One of {sorted(repro.CLAIMS)}.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_GLUE_DIR = flags.DEFINE_string("glue_dir", "", "GLUE's TSV folders (SST-2/, CoLA/, ...) for --claim=ewc; "
                                "default $GLUE_DIR.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Pretraining runs trained side by side, each in its own process "
                                "(lamb, mapnet); 0: one per CPU core on CPU, 1 on an accelerator.", lower_bound=0)
_SMOKE = flags.DEFINE_bool("smoke", False, "A tiny budget that only checks the pipeline (verdict meaningless).")


def main(argv):
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # JAX, TFDS and Orbax INFO lines only at --verbosity=1
  del argv
  from spanlm.repro.runs import Preempted
  try:
    rep = repro.run_claim(_CLAIM.value, _OUT.value, smoke=_SMOKE.value, glue_dir=_GLUE_DIR.value,
                          workers=_WORKERS.value, log=lambda s: print(s, flush=True))
  except (ValueError, NotImplementedError) as e:
    raise SystemExit(f"error: {e}")
  except Preempted as e:  # like spanlm.main: a preempted run checkpoints and exits 0
    print(f"stopped: {e}", flush=True)
    return
  print(f"verdict: {rep.verdict}. {rep.reason}")
  print(f"wrote {_OUT.value}/report.md ({rep.seconds / 60:.1f} min)")


if __name__ == "__main__":
  app.run(main)
