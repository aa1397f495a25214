"""What every claim writes: means and stds over seeds, a fixed comparison rule, report.md, learning-curve PNGs.

The verdict rules are decided before a run and are the same for every claim:

- `compare(a, b)`: arm a beats arm b (lower is better unless `higher_is_better`)
  when its mean is better by more than `z` standard errors of the difference
  of means (Welch's, sqrt(s_a^2/n_a + s_b^2/n_b)); it loses when b beats it
  the same way; otherwise it is a tie at this number of seeds.
- `verdict_beats_all`: "reproduced" when the claimed arm beats every baseline;
  "not reproduced" when some baseline beats it or its mean is no better than
  some baseline's; otherwise (better means, not by the margin) "inconclusive".
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from spanlm import paths

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not run yet")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for one value). Non-finite values give nan."""
  v = np.asarray(values, float)
  if v.size == 0 or not np.all(np.isfinite(v)):
    return math.nan, math.nan
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def pm(values: Sequence[float], digits: int = 3) -> str:
  """'mean ± std' over seeds, or 'diverged (k of n seeds)' when any run is non-finite."""
  v = np.asarray(values, float)
  bad = int(np.sum(~np.isfinite(v)))
  if bad:
    return f"diverged ({bad} of {v.size} seeds)"
  m, s = mean_std(v)
  return f"{m:.{digits}f} ± {s:.{digits}f}"


LEFT_PLATEAU = 0.05  # off the unigram plateau: held-out MLM loss at least this fraction below the unigram baseline


def below_unigram(loss, unigram) -> str:
  """'mean ± std%' over seeds of how far each held-out MLM loss is below its unigram baseline."""
  return pm(100 * (1 - np.asarray(loss, float) / np.asarray(unigram, float)), 1) + "%"


def plateau_reason(arm: str, loss, unigram) -> str | None:
  """Why `arm` is still on the unigram plateau (its mean held-out MLM loss less than LEFT_PLATEAU
  below the mean unigram baseline of the same targets), or None when it has left it."""
  below = 1 - np.mean(loss) / np.mean(unigram)
  if below >= LEFT_PLATEAU:
    return None
  where = f"only {100 * below:.1f}% below" if below >= 0 else f"{-100 * below:.1f}% above"
  return (f"{arm} is {where} the unigram baseline (needs {100 * LEFT_PLATEAU:.0f}% below): "
          f"still on the unigram plateau")


def compare(a: Sequence[float], b: Sequence[float], *, higher_is_better: bool = False, z: float = 2.0) -> str:
  """'better' | 'worse' | 'tie' for arm a against arm b (see the module docstring)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  bad_a, bad_b = not np.all(np.isfinite(a)), not np.all(np.isfinite(b))
  if bad_a or bad_b:
    return "tie" if bad_a and bad_b else ("worse" if bad_a else "better")
  sign = -1.0 if higher_is_better else 1.0
  diff = sign * (a.mean() - b.mean())  # < 0: a is better
  se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size) if min(a.size, b.size) > 1 else 0.0
  if diff < -z * se:
    return "better"
  if diff > z * se:
    return "worse"
  return "tie"


def verdict_beats_all(claimed: str, finals: dict, *, higher_is_better: bool = False, z: float = 2.0
                      ) -> tuple[str, str]:
  """(verdict, reason) for "arm `claimed` is better than every other arm in `finals` (name -> per-seed)."""
  mine = np.asarray(finals[claimed], float)
  parts, outcome = [], []
  for name, other in finals.items():
    if name == claimed:
      continue
    c = compare(mine, other, higher_is_better=higher_is_better, z=z)
    no_better = (np.mean(mine) <= np.mean(other)) if higher_is_better else (np.mean(mine) >= np.mean(other))
    if c == "tie" and (no_better or not np.all(np.isfinite(mine))):
      c = "no better"
    outcome.append(c)
    parts.append(f"{claimed} vs {name}: {c}")
  reason = "; ".join(parts) + f" (margin: {z:g} standard errors of the difference of means, {mine.size} seeds)"
  if all(c == "better" for c in outcome):
    return "reproduced", reason
  if any(c in ("worse", "no better") for c in outcome):
    return "not reproduced", reason
  return "inconclusive", reason


@dataclasses.dataclass
class Report:
  """Everything report.md says about one claim."""
  claim: str  # the --claim name
  title: str
  statement: str  # the paper's claim, in one or two sentences
  mirrors: str  # the paper's figure/table/section this mirrors
  settings: dict  # name -> value, printed as a list
  table: list  # rows (lists of cells); the first row is the header
  verdict: str
  reason: str
  figures: list = dataclasses.field(default_factory=list)  # file names in the output dir
  notes: list = dataclasses.field(default_factory=list)  # paragraphs: deviations, what was tried
  command: str = ""
  seconds: float = 0.0

  def markdown(self) -> str:
    if self.verdict not in VERDICTS:
      raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")
    lines = [f"# {self.title}", "", f"**Claim** ({self.claim}): {self.statement}", "",
             f"**Mirrors**: {self.mirrors}", "", f"**Verdict: {self.verdict}.** {self.reason}", ""]
    if self.command:
      lines += ["```", self.command, "```", ""]
    lines += ["## Settings", ""] + [f"- {k}: {v}" for k, v in self.settings.items()]
    if self.seconds:
      lines += [f"- wall time: {self.seconds / 60:.1f} min"]
    lines += ["", "## Results (mean ± std over seeds)", "", markdown_table(self.table), ""]
    lines += [f"![{f}]({f})" for f in self.figures]
    if self.notes:
      lines += ["", "## Notes", ""] + [n + "\n" for n in self.notes]
    return "\n".join(lines).rstrip() + "\n"

  def write(self, out: str) -> str:
    paths.path(out).mkdir(parents=True, exist_ok=True)
    path = os.path.join(out, "report.md")
    paths.write_text_atomic(path, self.markdown())  # local or gs://
    return path


def markdown_table(rows: list) -> str:
  head, *body = rows
  out = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
  return "\n".join(out + ["| " + " | ".join(map(str, r)) + " |" for r in body])


def plot_bands(path: str | None, curves: dict, *, xlabel: str, ylabel: str, title: str, logy: bool = False,
               ax=None, ylim=None, hline=None) -> None:
  """Mean curve and a ±std band per arm. `curves`: label -> (x [points], values [seeds, points])."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  own = ax is None
  if own:
    fig, ax = plt.subplots(figsize=(7, 4.2))
  for label, (x, values) in curves.items():
    v = np.asarray(values, float)
    mean, std = np.nanmean(v, 0), (np.nanstd(v, 0, ddof=1) if v.shape[0] > 1 else np.zeros(v.shape[1]))
    line, = ax.plot(x, mean, label=label, lw=1.4)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
  if logy:
    ax.set_yscale("log")
  if ylim is not None:
    ax.set_ylim(*ylim)
  if hline is not None:
    ax.axhline(hline, color="k", ls=":", lw=1)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  if own:
    fig.tight_layout()
    paths.write_figure(fig, path, dpi=110)  # local or gs://; closes the figure
