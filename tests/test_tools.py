"""The user-facing tools and the README's notebook example run as documented."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_inspect_masking_writes_consistent_arrays(tmp_path):
  out = tmp_path / "masking.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
  r = subprocess.run([sys.executable, "tools/inspect_masking.py", "--config=experiments/span_bert.py:tiny",
                      "--num_sequences=64", f"--out={out}", f"--workdir={tmp_path}/work"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  for noise in ("Unable to initialize backend", "Generating dataset", "Done writing"):  # library INFO lines
    assert noise not in r.stderr, noise
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  z = np.load(out)
  assert {"token_ids", "masked_ids", "mask", "word_start", "special"} <= set(z.files)
  assert all(z[k].shape == (64, 128) for k in ("token_ids", "masked_ids", "mask", "word_start", "special"))
  assert z["mask"].dtype == bool and z["special"].dtype == bool and z["word_start"].dtype == bool
  mask, special = z["mask"], z["special"]
  assert not (mask & special).any()
  np.testing.assert_array_equal(z["masked_ids"][~mask], z["token_ids"][~mask])
  assert abs(mask.sum() / (~special).sum() - 0.15) < 0.01
  assert abs(summary["mask_rate"] - mask.sum() / (~special).sum()) < 1e-9
  # A span starts at a word start (whole-word spans).
  starts = mask & ~np.pad(mask[:, :-1], ((0, 0), (1, 0)))
  assert z["word_start"][starts].all()
  assert "[[" in r.stdout and "example:" in r.stdout


@pytest.mark.slow
def test_readme_notebook_example_runs():
  readme = open(os.path.join(ROOT, "README.md")).read()
  (code,) = re.findall(r"```python\n(import jax, numpy as np, spanlm.*?)```", readme, re.S)
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)
  assert np.isfinite(float(scope["metrics"]["loss"]))
  assert int(scope["state"].step) == 1
  assert float(scope["masked"].weights.sum()) > 0
