r"""Official SQuAD v1.1 / v2.0 EM and F1 for a predictions file.

  python tools/squad_eval.py --data=dev-v1.1.json --predictions=predictions.json
  python tools/squad_eval.py --data=dev-v2.0.json --predictions=predictions.json \
      --na_probs=null_odds.json [--na_threshold=1.0] [--out=eval.json]

`predictions.json` is {question_id: answer_text} ("" = no answer);
`null_odds.json` is {question_id: score}, higher = more likely unanswerable.
Prints one JSON object {"exact_match": ..., "f1": ..., ...} (×100); v2.0 adds
HasAns_/NoAns_ subsets and, with --na_probs, best_exact/best_f1 and thresholds.
Questions without a prediction score 0 and are counted in "missing".
"""

import argparse
import json
import sys

from spanlm import paths
from spanlm.tasks import squad_metrics


def _load_json(path: str, what: str):
  """A JSON file, local or gs://."""
  try:
    return json.loads(paths.read_text(path))
  except FileNotFoundError:
    sys.exit(f"error: {what} file {path!r} not found")
  except json.JSONDecodeError as e:
    sys.exit(f"error: {what} file {path!r} is not valid JSON ({e}); expected the SQuAD format")
  except ValueError as e:  # an unknown URL scheme, an unreachable bucket (paths.access_error)
    sys.exit(f"error: {e}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", required=True, help="SQuAD-format dataset JSON")
  parser.add_argument("--predictions", required=True, help="{qid: answer} JSON")
  parser.add_argument("--na_probs", default="", help="{qid: null odds} JSON (v2.0)")
  parser.add_argument("--na_threshold", type=float, default=1.0,
                      help="null odds above this count as predicting no answer (v2.0)")
  parser.add_argument("--version", choices=("auto", "1.1", "2.0"), default="auto",
                      help="scoring rules; auto reads the file's version / is_impossible")
  parser.add_argument("--out", default="", help="also write the JSON here")
  args = parser.parse_args(argv)

  dataset = _load_json(args.data, "dataset")
  if not isinstance(dataset, dict) or not isinstance(dataset.get("data"), list):
    sys.exit(f"error: {args.data} has no top-level 'data' list; expected the SQuAD format")
  predictions = _load_json(args.predictions, "predictions")
  if not isinstance(predictions, dict):
    sys.exit(f"error: {args.predictions} must be a JSON object {{question_id: answer}}")
  na_probs = _load_json(args.na_probs, "null odds") if args.na_probs else None
  v2 = None if args.version == "auto" else args.version == "2.0"
  result = squad_metrics.evaluate(dataset, predictions, na_probs, args.na_threshold, v2=v2)
  if result["missing"]:
    print(f"warning: {result['missing']} of {result['total']} questions have no prediction "
          f"(scored 0)", file=sys.stderr)
  text = json.dumps(result)
  print(text)
  if args.out:
    paths.path(args.out).write_text(text + "\n")  # local or gs://
  return result


if __name__ == "__main__":
  main()
