r"""Elastic weight consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks").

After task A, each parameter's importance to A is its diagonal empirical Fisher
information, the mean over A's examples of the squared per-example gradient of
the loss (negative log-likelihood of the observed labels):

  F_i = (1/N) sum_n (d loss_n / d theta_i)^2   at theta = theta*_A.

This is the mean of squares of PER-EXAMPLE gradients (jax.vmap of jax.grad),
not the square of the batch-mean gradient, which vanishes at a minimum. While
training task B the loss gets the quadratic penalty (eq. 3 of the paper)

  L(theta) = L_B(theta) + (lambda / 2) sum_i F_i (theta_i - theta*_A,i)^2,

whose gradient is lambda * F * (theta - theta*_A), so parameters that mattered
for A are held near theta*_A while the rest move freely.

Storage: one .npz with arrays "fisher/<param path>" and "theta/<param path>"
(path components joined by '/'), written by tools/compute_fisher.py to
WORKDIR_A/ewc/fisher.npz and read through config.ewc.fisher_path.
"""

from __future__ import annotations

import os
from typing import Callable

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np


def fisher_sums(loss_fn: Callable, params, examples) -> tuple:
  """Sum over examples of the squared per-example gradient, and the number of examples counted.

  `loss_fn(params, example) -> (loss, valid)` takes ONE example (no leading
  axis); `examples` has a leading example axis. Examples with valid == False
  (e.g. padding rows with nothing to predict) are left out of both sums.
  """
  grads, valid = jax.vmap(jax.grad(loss_fn, has_aux=True), in_axes=(None, 0))(params, examples)
  w = valid.astype(jnp.float32)
  sq = jax.tree.map(lambda g: jnp.einsum("n,n...->...", w, jnp.square(g)), grads)
  return sq, jnp.sum(w)


def diagonal_fisher(loss_fn: Callable, params, batches) -> tuple:
  """Empirical diagonal Fisher E_n[g_n^2] over an iterable of example batches; returns (fisher, N)."""
  step = jax.jit(lambda p, b: fisher_sums(loss_fn, p, b))
  total, count = None, 0.0
  for batch in batches:
    sq, n = step(params, batch)
    total = sq if total is None else jax.tree.map(jnp.add, total, sq)
    count += float(n)
  if total is None or count == 0:
    raise ValueError("no valid examples to estimate the Fisher information from")
  return jax.tree.map(lambda s: s / count, total), int(count)


def penalty(params, fisher, theta_star, lam: float):
  """(lam / 2) * sum_i F_i (theta_i - theta*_i)^2 over all parameter leaves."""
  terms = jax.tree.map(lambda p, f, t: jnp.sum(f * jnp.square(p - t)), params, fisher, theta_star)
  return 0.5 * lam * sum(jax.tree.leaves(terms))


def _flat(tree, prefix):
  return {f"{prefix}/" + "/".join(k): np.asarray(v)
          for k, v in flax.traverse_util.flatten_dict(jax.device_get(tree)).items()}


def save(path: str, fisher, theta_star) -> None:
  """Write the Fisher diagonal and theta*_A (nested param dicts) to one .npz."""
  import io

  from spanlm.paths import is_remote, path as as_path
  buffer = io.BytesIO()
  np.savez(buffer, **_flat(fisher, "fisher"), **_flat(theta_star, "theta"))
  target = as_path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(target):
    target.write_bytes(buffer.getvalue())  # an object appears whole
  else:
    tmp = target.with_name(target.name + ".tmp.npz")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, target)  # readers never see a half-written file


def load(path: str) -> tuple[dict, dict]:
  """(fisher, theta_star) as nested dicts, from a file written by `save`."""
  import io

  from spanlm.paths import path as as_path
  if not as_path(path).is_file():
    raise FileNotFoundError(f"EWC Fisher file {path!r} not found; create it with "
                            "tools/compute_fisher.py --config=... --workdir=TASK_A_WORKDIR")
  with np.load(io.BytesIO(as_path(path).read_bytes())) as z:
    parts = {"fisher": {}, "theta": {}}
    for name in z.files:
      kind, _, key = name.partition("/")
      if kind in parts:
        parts[kind][tuple(key.split("/"))] = z[name]
  if not parts["fisher"] or parts["fisher"].keys() != parts["theta"].keys():
    raise ValueError(f"{path} is not an EWC file (needs matching fisher/* and theta/* arrays)")
  return (flax.traverse_util.unflatten_dict(parts["fisher"]),
          flax.traverse_util.unflatten_dict(parts["theta"]))


def make_penalty(ewc_config, params_like) -> Callable | None:
  """params -> EWC penalty for `config.ewc`, or None when EWC is off (no file or lambda 0).

  `params_like` (arrays or ShapeDtypeStructs) is checked against the stored
  tree so a Fisher from a different model fails here, not inside jit.
  """
  if ewc_config is None or not ewc_config.fisher_path or not ewc_config.lambda_:
    return None
  fisher, theta = load(ewc_config.fisher_path)
  want = {k: v.shape for k, v in flax.traverse_util.flatten_dict(params_like).items()}
  have = {k: v.shape for k, v in flax.traverse_util.flatten_dict(fisher).items()}
  if want != have:
    diff = sorted({"/".join(k) for k, _ in set(want.items()) ^ set(have.items())})[:4]
    raise ValueError(f"EWC file {ewc_config.fisher_path} does not match the model's parameters "
                     f"(first differences: {diff}); compute it with the task-A config of this model")
  fisher = jax.tree.map(jnp.asarray, fisher)
  theta = jax.tree.map(jnp.asarray, theta)
  lam = float(ewc_config.lambda_)
  return lambda params: penalty(params, fisher, theta, lam)


# --- spanlm pretraining models ------------------------------------------------------------------
def trainer_fisher(trainer, params, batches, seed: int = 0) -> tuple:
  """Diagonal empirical Fisher of a spanlm Trainer's objective at `params`; returns (fisher, N).

  An example is one sequence; its loss is the objective's loss on that row
  alone (for MLM: the mean negative log-likelihood of its masked tokens, the
  per-token scale of the training loss). Masking uses a fixed RNG per batch,
  dropout is off. Rows with nothing to predict (padding) are not counted.
  """
  obj = trainer.objective

  def row_loss(p, row):
    mb = jax.tree.map(lambda x: x[None], row)
    den = obj.denominators(mb)
    loss = obj.loss(obj.sums(p, mb, None, deterministic=True, frozen=trainer.frozen), den)
    return loss, den.get("num_predictions", jnp.float32(1)) > 0

  prepare = jax.jit(obj.prepare)
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0xF15E)
  prepared = (prepare(jax.random.fold_in(key, i), b) for i, b in enumerate(batches))
  return diagonal_fisher(row_loss, params, prepared)


def start_from_theta_star(trainer, state, ewc_config):
  """`state` with params = theta*_A from config.ewc.fisher_path (task B continues from task A)."""
  _, theta = load(ewc_config.fisher_path)
  return state.replace(params=jax.device_put(theta, trainer.state_shardings.params))
