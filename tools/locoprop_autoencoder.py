r"""LocoProp vs SGD and Adam on the deep-autoencoder benchmark, scaled to scikit-learn's digits.

  python tools/locoprop_autoencoder.py --out=/tmp/locoprop --steps=2000

The paper (Amid, Anil, Warmuth 2022, §5) trains the MNIST autoencoder
784-1000-500-250-30-250-500-1000-784. Here the data are the 1,797 8x8 digits
of sklearn.datasets.load_digits (64 pixels scaled to [0, 1], bundled with
scikit-learn, nothing downloaded), so every width is scaled down by about 8:
64-128-64-32-8-32-64-128-64, tanh hidden layers, a linear 8-unit code and a
sigmoid output trained with per-image binary cross-entropy summed over pixels
(the loss reported: mean over all 1,797 images). Each method runs a small
learning-rate grid (--grid) for the same number of minibatch steps and the best
final train loss is reported; every run is in the JSON. LocoProp's inner solver is
the reference notebook's (--inner_solver=rmsprop, the default; its grid is the base
rate) or spanlm's earlier proximal GD (--inner_solver=gd_prox; grid over gamma).
The multi-seed comparison with a verdict is `tools/reproduce.py --claim=locoprop`.

Writes OUT/locoprop_autoencoder.{json,md,png}: the table (method, setting,
steps, final train loss, wall time) and the loss curves of the best runs.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from spanlm import paths
from spanlm.optim import locoprop

_OUT = flags.DEFINE_string("out", "locoprop", "Output directory.")
_STEPS = flags.DEFINE_integer("steps", 2000, "Minibatch steps per run.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per step.")
_EVAL = flags.DEFINE_integer("eval_every", 50, "Steps between full-data loss evaluations.")
_INNER = flags.DEFINE_integer("inner_steps", 10, "LocoProp: local steps per layer per step (T).")
_SOLVER = flags.DEFINE_enum("inner_solver", "rmsprop", list(locoprop.SOLVERS),
                            "LocoProp inner solver: the reference's RMSProp, or proximal GD.")
_ETA = flags.DEFINE_float("eta", 1.0, "LocoProp gd_prox: proximal strength 1/(2 eta) ||W - W_old||^2.")
_GRID = flags.DEFINE_bool("grid", True, "Try each method's small grid (False: first setting only).")
_SEED = flags.DEFINE_integer("seed", 0, "Init and minibatch order.")

SIZES = (64, 128, 64, 32, 8, 32, 64, 128, 64)
ACTS = ("tanh", "tanh", "tanh", "identity", "tanh", "tanh", "tanh", "sigmoid")
# method -> settings tried (learning rate; LocoProp gd_prox: (gamma, inner_lr), first-step-equivalent
# lr = product; LocoProp rmsprop: the inner RMSProp's base rate, act_lr 10 as in the notebook)
RMSPROP_GRID = [1e-5, 3e-5, 1e-4]
GRID = {
    "sgd": [0.03, 0.1, 0.3],
    "sgd (momentum 0.9)": [0.01, 0.03, 0.003],
    "adam": [1e-3, 3e-3, 1e-2],
    "locoprop-s": [(1.0, 0.01), (3.0, 0.01), (10.0, 0.01)],
    "locoprop-m": [(1.0, 0.01), (3.0, 0.01), (10.0, 0.01)],
}


def load_digits() -> np.ndarray:
  try:
    from sklearn.datasets import load_digits as sk_load
  except ImportError as e:
    raise SystemExit("scikit-learn is needed for the digits data: pip install 'spanlm[examples]' "
                     "(or pip install scikit-learn)") from e
  return (sk_load().data / 16.0).astype(np.float32)


def bce(logits, batch):
  return jnp.sum(jnp.logaddexp(0.0, logits) - batch["x"] * logits, axis=-1)


def full_loss(params, x):
  return jnp.mean(bce(locoprop.forward(params, ACTS, x)[0], {"x": x}))


def make_step(method: str, setting):
  """A jitted (params, opt_state, batch) -> (params, opt_state) for one method and setting."""
  if method.startswith("locoprop"):
    kw = (dict(learning_rate=setting) if _SOLVER.value == "rmsprop" else
          dict(gamma=setting[0], inner_lr=setting[1], eta=_ETA.value))
    step = functools.partial(locoprop.locoprop_step, activations=ACTS, loss_fn=bce, variant=method[-1].upper(),
                             solver=_SOLVER.value, inner_steps=_INNER.value, **kw)
    return "locoprop", jax.jit(lambda p, s, b: step(p, s, batch=b)[:2])
  tx = optax.adam(setting) if method == "adam" else optax.sgd(setting, momentum=0.9 if "momentum" in method else None)

  def sgd_like(p, s, b):
    grads = jax.grad(lambda q: jnp.mean(bce(locoprop.forward(q, ACTS, b["x"])[0], b)))(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s
  return tx, jax.jit(sgd_like)


def train(method, setting, data):
  rng = np.random.default_rng(_SEED.value)
  params = locoprop.init_mlp(jax.random.PRNGKey(_SEED.value), SIZES)
  tx, step = make_step(method, setting)
  state = locoprop.init_state(params) if tx == "locoprop" else tx.init(params)
  evaluate = jax.jit(full_loss)
  order = np.concatenate([rng.permutation(len(data)) for _ in range(
      _STEPS.value * _BATCH.value // len(data) + 1)])
  batches = [data[order[i * _BATCH.value:(i + 1) * _BATCH.value]] for i in range(_STEPS.value)]
  jax.block_until_ready(step(params, state, {"x": batches[0]}))  # compile outside the timing
  curve, seconds, start = [(0, float(evaluate(params, data)))], 0.0, time.time()
  for i, xb in enumerate(batches, 1):
    params, state = step(params, state, {"x": xb})
    if i % _EVAL.value == 0 or i == _STEPS.value:
      loss = float(evaluate(params, data))  # blocks: the timing includes all steps so far
      seconds += time.time() - start
      curve.append((i, loss))
      start = time.time()
      if not np.isfinite(loss):
        break
  return {"method": method, "setting": setting, "steps": curve[-1][0], "train_loss": curve[-1][1],
          "wall_seconds": seconds, "curve": curve}


def describe(method, setting):
  if method.startswith("locoprop") and _SOLVER.value == "rmsprop":
    return f"rmsprop inner lr={setting:g}, act_lr=10, T={_INNER.value} (constant outer rate)"
  if method.startswith("locoprop"):
    return f"gamma={setting[0]:g}, inner_lr={setting[1]:g}, T={_INNER.value}, eta={_ETA.value:g}"
  return f"lr={setting:g}"


def main(argv):
  from spanlm.metrics import quiet_library_logs
  quiet_library_logs()  # JAX, TFDS and Orbax INFO lines only at --verbosity=1
  del argv
  data = load_digits()
  paths.check_bucket_or_exit(_OUT.value)  # a bad URL or gs:// bucket: one line, before any training
  out = str(paths.path(_OUT.value))  # local (made absolute) or gs://
  paths.path(out).mkdir(parents=True, exist_ok=True)
  runs = []
  for method, settings in GRID.items():
    if method.startswith("locoprop") and _SOLVER.value == "rmsprop":
      settings = RMSPROP_GRID
    for setting in settings if _GRID.value else settings[:1]:
      r = train(method, setting, data)
      runs.append(r)
      print(f"{method:20s} {describe(method, setting):45s} loss {r['train_loss']:.3f} "
            f"({r['wall_seconds']:.1f}s)", flush=True)
  ok = lambda r: r["train_loss"] if np.isfinite(r["train_loss"]) else np.inf
  best = [min((r for r in runs if r["method"] == m), key=ok) for m in GRID]
  rows = ["| method | setting (best of grid) | steps | train loss | wall time (s) |", "|---|---|---|---|---|"]
  rows += [f"| {r['method']} | {describe(r['method'], r['setting'])} | {r['steps']} | {r['train_loss']:.3f} | "
           f"{r['wall_seconds']:.1f} |" for r in best]
  table = "\n".join(rows)
  meta = {"data": "sklearn digits, 1797 x 64, pixels / 16", "sizes": SIZES, "activations": ACTS,
          "loss": "per-image sigmoid cross-entropy summed over 64 pixels, mean over all images",
          "steps": _STEPS.value, "batch_size": _BATCH.value, "inner_steps": _INNER.value, "eta": _ETA.value,
          "inner_solver": _SOLVER.value,
          "device": jax.devices()[0].device_kind}
  paths.write_text_atomic(os.path.join(out, "locoprop_autoencoder.json"),
                          json.dumps({"meta": meta, "best": best, "runs": runs}, indent=1))
  paths.write_text_atomic(os.path.join(out, "locoprop_autoencoder.md"), table + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for r in best:
    steps, losses = zip(*r["curve"])
    ax.plot(steps, losses, label=f"{r['method']} ({describe(r['method'], r['setting'])})")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (BCE per image)")
  ax.set_title("Deep autoencoder 64-128-64-32-8-32-64-128-64 on digits")
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.write_figure(fig, os.path.join(out, "locoprop_autoencoder.png"), dpi=120)
  print(table)
  print(f"wrote {out}/locoprop_autoencoder.{{json,md,png}}")


if __name__ == "__main__":
  app.run(main)
