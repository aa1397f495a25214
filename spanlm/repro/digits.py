"""scikit-learn's 8x8 digits (1,797 images, bundled with scikit-learn, nothing downloaded) and a
seed-vmapped training loop for the small optimizer claims.

Every arm of a claim gets the same data, the same minibatch order for a given seed, the same
initialisation for a given seed and the same number of steps; seeds run side by side under
jax.vmap (one compiled step per arm and setting).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def load() -> tuple[np.ndarray, np.ndarray]:
  """Pixels scaled to [0, 1] (float32 [1797, 64]) and labels (int32 [1797])."""
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:
    raise SystemExit("scikit-learn is needed for the digits claims: pip install 'spanlm[examples]' "
                     "(or pip install scikit-learn)") from e
  d = load_digits()
  return (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)


def split(x, y, held_out: float = 0.25):
  """A fixed (seed-independent) stratified split: (x_train, y_train, x_test, y_test)."""
  rng = np.random.default_rng(12345)
  test = np.zeros(len(y), bool)
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    test[rng.choice(idx, int(round(held_out * len(idx))), replace=False)] = True
  return x[~test], y[~test], x[test], y[test]


def batch_order(n: int, batch: int, steps: int, seed: int) -> np.ndarray:
  """[steps, batch] row indices: epochs of fresh permutations (the seed picks the order)."""
  rng = np.random.default_rng(1000 + seed)
  epochs = steps * batch // n + 1
  return np.concatenate([rng.permutation(n) for _ in range(epochs)])[:steps * batch].reshape(steps, batch)


def warmup_linear(peak: float, steps: int, warmup_frac: float = 0.05) -> np.ndarray:
  """Linear warmup to `peak` over warmup_frac * steps, then linear decay to 0 (as the LocoProp
  notebook's 5-of-100-epochs warmup and decay)."""
  t = np.arange(steps, dtype=np.float64)
  w = max(int(round(warmup_frac * steps)), 1)
  return peak * np.where(t < w, (t + 1) / w, np.maximum(0.0, 1 - (t - w) / max(steps - w, 1)))


def run_seeds(init: Callable, step: Callable, evaluate: Callable, n_train: int, *, seeds: int, steps: int,
              batch: int, lrs, eval_every: int) -> tuple[np.ndarray, dict]:
  """Train `seeds` copies side by side; returns (eval steps [P], metric -> [seeds, P]).

  init(seed_key) -> state; step(state, batch_idx [B], lr) -> state; evaluate(state) -> dict of
  scalars. All three are vmapped over seeds; step and evaluate are jitted once. Evaluation at step
  0 and every `eval_every` steps (which must divide `steps`). A seed whose metrics turn non-finite keeps nan.
  """
  import jax
  import jax.numpy as jnp

  if steps % eval_every:
    raise ValueError(f"steps={steps} must be a multiple of eval_every={eval_every}")
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(seeds))
  state = jax.vmap(init)(keys)
  orders = np.stack([batch_order(n_train, batch, steps, s) for s in range(seeds)], 1)  # [steps, seeds, B]
  vstep = jax.vmap(step, in_axes=(0, 0, None))

  @jax.jit
  def chunk(state, idx, lr):  # eval_every steps in one call: scan, not a Python loop
    return jax.lax.scan(lambda s, a: (vstep(s, a[0], a[1]), None), state, (idx, lr))[0]

  veval = jax.jit(jax.vmap(evaluate))
  lrs = np.asarray(lrs, np.float32)
  at, history = [0], [jax.device_get(veval(state))]
  for i in range(0, steps, eval_every):
    state = chunk(state, orders[i:i + eval_every], lrs[i:i + eval_every])
    at.append(i + eval_every)
    history.append(jax.device_get(veval(state)))
  metrics = {k: np.stack([np.asarray(h[k], float) for h in history], 1) for k in history[0]}
  return np.asarray(at), metrics


def pick_best(results: dict, metric: str, *, higher_is_better: bool = False):
  """The grid point whose final `metric`, averaged over seeds, is best (non-finite = worst)."""
  def score(key):
    v = results[key][1][metric][:, -1]
    m = float(np.mean(v)) if np.all(np.isfinite(v)) else np.inf * (-1 if higher_is_better else 1)
    return -m if higher_is_better else m
  return min(results, key=score)
