"""Assemble a GLUE leaderboard submission from fine-tuning workdirs.

  python tools/glue_submission.py /runs/cola /runs/sst2 ... /runs/mnli --out=submission.zip

Each WORKDIR is a `python -m spanlm.main --config=experiments/glue.py:<task>` run whose
predictions_test/ holds `<TASK>.tsv` (the MNLI run also holds MNLI-mm.tsv and AX.tsv, the
diagnostic set predicted by the MNLI model). The GLUE server (gluebenchmark.com/submit)
takes one zip of eleven files at its root, each with the header `index<TAB>prediction` and
one row per test example: CoLA, SST-2, MRPC, QQP, WNLI predict 0/1; MNLI-m, MNLI-mm, AX
predict entailment / neutral / contradiction; QNLI, RTE entailment / not_entailment;
STS-B a score in [0, 5]. Every file is checked (header, labels, unique ids) before the
zip is written, and a row count other than the GLUE test set's is a warning; a missing
file is an error unless --partial is given (the server rejects incomplete submissions).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile

# Rows in each GLUE test set (the diagnostic AX included).
TEST_ROWS = {"CoLA": 1063, "SST-2": 1821, "MRPC": 1725, "QQP": 390965, "STS-B": 1379, "MNLI-m": 9796,
             "MNLI-mm": 9847, "QNLI": 5463, "RTE": 3000, "WNLI": 146, "AX": 1104}
_BINARY = ("0", "1")
_NLI3 = ("contradiction", "entailment", "neutral")
_NLI2 = ("entailment", "not_entailment")
LABELS = {"CoLA": _BINARY, "SST-2": _BINARY, "MRPC": _BINARY, "QQP": _BINARY, "WNLI": _BINARY,
          "MNLI-m": _NLI3, "MNLI-mm": _NLI3, "AX": _NLI3, "QNLI": _NLI2, "RTE": _NLI2, "STS-B": ()}


def check_file(path: str, stem: str) -> tuple[int, list[str]]:
  """(rows, problems) of one prediction file (local or gs://)."""
  from spanlm import paths
  problems = []
  lines = paths.path(path).read_text(encoding="utf-8").splitlines()
  if not lines or lines[0] != "index\tprediction":
    return 0, [f"{path}: the first line must be 'index<TAB>prediction'"]
  ids = set()
  for n, line in enumerate(lines[1:], start=2):
    fields = line.split("\t")
    if len(fields) != 2:
      problems.append(f"{path} line {n}: {len(fields)} columns, expected 2")
      continue
    index, value = fields
    if index in ids:
      problems.append(f"{path} line {n}: index {index!r} repeated")
    ids.add(index)
    if LABELS[stem]:
      if value not in LABELS[stem]:
        problems.append(f"{path} line {n}: prediction {value!r} is not one of {LABELS[stem]}")
    else:
      try:
        ok = 0.0 <= float(value) <= 5.0
      except ValueError:
        ok = False
      if not ok:
        problems.append(f"{path} line {n}: STS-B prediction {value!r} is not a number in [0, 5]")
    if len(problems) >= 5:
      break
  rows = len(lines) - 1
  if not problems and rows != TEST_ROWS[stem]:
    print(f"warning: {path}: {rows} rows, the GLUE {stem} test set has {TEST_ROWS[stem]} (a capped or "
          f"partial test file? rows skipped as malformed? see the run's log)", file=sys.stderr)
  return rows, problems


def collect(workdirs: list[str]) -> dict[str, str]:
  """{stem: path} over the workdirs' predictions_test/ folders (local or gs://); a stem found twice is
  an error."""
  from spanlm import paths
  found = {}
  for workdir in workdirs:
    paths.check_bucket(workdir)
    folder = paths.path(workdir) / "predictions_test"
    if not folder.is_dir():
      raise ValueError(f"{workdir} has no predictions_test/ folder; is it a finished GLUE fine-tuning run "
                       f"with config.task.predict_split=test?")
    for child in sorted(folder.iterdir(), key=lambda p: p.name):
      stem, ext = os.path.splitext(child.name)
      if ext != ".tsv" or stem not in TEST_ROWS:
        continue
      if stem in found:
        raise ValueError(f"{stem}.tsv is in both {paths.path(found[stem]).parent} and {folder}; pass one run "
                         f"per task")
      found[stem] = str(child)
  return found


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+", help="GLUE fine-tuning workdirs")
  parser.add_argument("--out", default="submission.zip", help="the zip to write")
  parser.add_argument("--partial", action="store_true", help="write the zip even if files are missing")
  args = parser.parse_args(argv)
  from spanlm import paths
  try:
    paths.check_bucket(args.out)
    found = collect(args.workdirs)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  problems, counts = [], {}
  for stem, path in sorted(found.items()):
    counts[stem], bad = check_file(path, stem)
    problems += bad
  missing = [s for s in TEST_ROWS if s not in found]
  if problems:
    print("error: the predictions do not match the GLUE format:\n  " + "\n  ".join(problems), file=sys.stderr)
    return 2
  if missing and not args.partial:
    print(f"error: missing {', '.join(f'{s}.tsv' for s in missing)} (MNLI-mm.tsv and AX.tsv come from the "
          f"MNLI run); fine-tune those tasks, or pass --partial to zip what there is", file=sys.stderr)
    return 2
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    for stem, path in sorted(found.items()):
      z.writestr(f"{stem}.tsv", paths.path(path).read_bytes())  # flat: the server reads them at the zip's root
  paths.path(args.out).write_bytes(buf.getvalue())  # --out: a local file or a gs:// URL
  print(f"wrote {args.out}: {len(found)} files ({', '.join(f'{s} {counts[s]}' for s in sorted(found))})"
        + (f"; missing {', '.join(missing)}" if missing else ""))
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
