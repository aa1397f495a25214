"""Small reproductions of the papers' headline claims: one command per claim, a report with plots.

  python tools/reproduce.py --claim=locoprop --out=/tmp/repro_locoprop

Each claim lives in its own module (imported only when that claim runs) with a
`run(out, smoke=False, log=print) -> report.Report`. Every arm of a claim gets the same data,
the same step budget, the same number of grid points and at least 3 seeds; the verdict rule
(spanlm.repro.report) is fixed before the run and never tuned after it.
"""

from __future__ import annotations

import importlib
import os
import time

from spanlm import paths

# --claim name -> module, or the reason it cannot run yet (with its planned command and budget).
CLAIMS = {
    "locoprop": "spanlm.repro.claim_locoprop",
    "hypergradient": "spanlm.repro.claim_hypergradient",
    "clr": "spanlm.repro.claim_clr",
    "lamb": "spanlm.repro.claim_lamb",
    "mapnet": "spanlm.repro.claim_mapnet",
    "ewc": "spanlm.repro.claim_ewc",
    "spanbert": "spanlm.repro.claim_spanbert",
}
NEEDS_GLUE = ("ewc",)
PARALLEL_RUNS = ("lamb", "mapnet")  # claims whose pretraining runs go side by side (spanlm.repro.runs)
NOT_IMPLEMENTED = {
}


def run_claim(name: str, out: str, *, smoke: bool = False, log=print, glue_dir: str = "", workers: int = 0):
  """Run one claim end to end, write OUT/report.md and OUT/*.png; returns the Report.

  `glue_dir` (GLUE's TSV folders) is passed to the claims that fine-tune on GLUE (ewc); `workers`
  (0: one per CPU core on CPU, 1 on an accelerator) to the claims of PARALLEL_RUNS."""
  if name in NOT_IMPLEMENTED:
    raise NotImplementedError(f"--claim={name} is not implemented yet: {NOT_IMPLEMENTED[name]}")
  if name not in CLAIMS:
    raise ValueError(f"unknown --claim={name!r}; choose one of {sorted(CLAIMS)} "
                     f"(not implemented yet: {sorted(NOT_IMPLEMENTED)})")
  paths.check_bucket(out)  # a gs:// --out: one line now if its bucket cannot be reached
  paths.path(out).mkdir(parents=True, exist_ok=True)
  start = time.time()
  options = {"glue_dir": glue_dir} if name in NEEDS_GLUE else {}
  workers_ = {"workers": workers} if name in PARALLEL_RUNS else {}
  rep = importlib.import_module(CLAIMS[name]).run(out, smoke=smoke, log=log, **options, **workers_)
  if name in PARALLEL_RUNS:
    rep.settings["runs"] = (f"{workers} at a time" if workers else "side by side, one process per CPU core "
                            "(one at a time on an accelerator)")
  rep.seconds = time.time() - start
  rep.command = (f"python tools/reproduce.py --claim={name} --out={out}"
                 + "".join(f" --{k}={v}" for k, v in options.items()) + (" --smoke" if smoke else ""))
  if smoke:
    rep.notes.append("SMOKE RUN: a tiny budget that checks the pipeline; the verdict means nothing.")
  rep.write(out)
  return rep
