"""Optimizers against independent NumPy references of their papers' equations, schedules against
closed forms, config wiring (names, groups, masks, errors) and the logged optimizer metrics."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spanlm
from spanlm import configs, optim
from spanlm.optim import schedules

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                    "bias": jnp.zeros(3, jnp.float32)},  # zero norm: ratio 1 on the first step
          "ln": {"scale": jnp.ones(3, jnp.float32), "bias": jnp.zeros(3, jnp.float32)},
          "out": {"kernel": jnp.asarray(3.0 * rng.normal(size=(3, 2)), jnp.float32)}}


def gradient_sequence(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
          for _ in range(steps)]


def lr_at(count):  # a varying rate, so the schedule's step index is checked too
  return 0.05 * (count + 1) / (count + 3)


def run_tx(tx, params, grads):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def flat(tree):
  return {"/".join(str(k.key) for k in path): np.asarray(v, np.float64)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_close(a, b, rtol=2e-5, atol=1e-6):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=atol, err_msg=k)


def is_decayed(path):  # decay_mask's rule, restated: not LayerNorm, not biases
  return not path.endswith("bias") and not path.endswith("scale")


# --- LAMB --------------------------------------------------------------------------------------
def numpy_lamb(params, grads, b1, b2, eps, wd, wd_mask, tr_mask, min_norm=0.0, max_norm=np.inf):
  """You et al. 2020, Algorithm 2, one leaf at a time in float64."""
  w, m, v = flat(params), {}, {}
  for t, g in enumerate(grads, start=1):
    g = flat(g)
    for k in w:
      m[k] = b1 * m.get(k, 0.0) + (1 - b1) * g[k]
      v[k] = b2 * v.get(k, 0.0) + (1 - b2) * g[k] ** 2
      r = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      u = r + wd * w[k] if wd_mask(k) else r
      ratio = 1.0
      w_norm, u_norm = np.linalg.norm(w[k]), np.linalg.norm(u)
      if tr_mask(k) and w_norm > 0 and u_norm > 0:
        ratio = np.clip(w_norm, min_norm, max_norm) / u_norm
      w[k] = w[k] - lr_at(t - 1) * ratio * u
  return w


@pytest.mark.slow
def test_lamb_equals_optax_lamb_when_the_ratio_covers_every_leaf():
  params, grads = make_params(), gradient_sequence(make_params(), 6)
  ours = optim.lamb(lr_at, weight_decay=0.1, weight_decay_mask=optim.decay_mask, trust_ratio_mask=True)
  reference = optax.lamb(lr_at, weight_decay=0.1, mask=optim.decay_mask)
  assert_close(run_tx(ours, params, grads)[0], run_tx(reference, params, grads)[0])
  # ... and with no masks at all.
  assert_close(run_tx(optim.lamb(lr_at, weight_decay=0.1), params, grads)[0],
               run_tx(optax.lamb(lr_at, weight_decay=0.1), params, grads)[0])


@pytest.mark.parametrize("min_norm,max_norm", [(0.0, None), (1.5, 4.0)])
def test_lamb_with_albert_masks_and_phi_bounds_matches_the_paper(min_norm, max_norm):
  params, grads = make_params(), gradient_sequence(make_params(), 6)
  tx = optim.lamb(lr_at, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1,
                  weight_decay_mask=optim.decay_mask, min_norm=min_norm, max_norm=max_norm)
  got, state = run_tx(tx, params, grads)
  want = numpy_lamb(params, grads, 0.8, 0.99, 1e-6, 0.1, is_decayed, is_decayed,
                    min_norm, np.inf if max_norm is None else max_norm)
  fg = flat(got)
  for k in want:
    np.testing.assert_allclose(fg[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
  # LayerNorm and biases excluded from the ratio: it differs from optax.lamb's there.
  other = flat(run_tx(optax.lamb(lr_at, b1=0.8, b2=0.99, weight_decay=0.1, mask=optim.decay_mask),
                      params, grads)[0])
  assert not np.allclose(other["ln/scale"], fg["ln/scale"], rtol=1e-3)
  # The ratios of the last update are in the state, one per leaf under the ratio (2 kernels).
  metrics = optim.optimizer_metrics(state)
  assert metrics["trust_ratio/min"] <= metrics["trust_ratio/mean"] <= metrics["trust_ratio/max"]
  assert {"trust_ratio/min", "learning_rate"} <= metrics.keys()
  np.testing.assert_allclose(metrics["learning_rate"], lr_at(len(grads) - 1), rtol=1e-6)


def test_trust_ratio_is_one_when_a_norm_is_zero():
  tx = optim.scale_by_trust_ratio()
  params = {"zero_w": jnp.zeros(3), "zero_u": jnp.ones(3), "both": jnp.full(3, 2.0)}
  updates = {"zero_w": jnp.ones(3), "zero_u": jnp.zeros(3), "both": jnp.full(3, 0.5)}
  out, state = tx.update(updates, tx.init(params), params)
  np.testing.assert_allclose(out["zero_w"], 1.0)
  np.testing.assert_allclose(out["both"], 0.5 * 4.0)  # ||w|| / ||u|| = 4
  np.testing.assert_allclose(sorted(np.asarray(state.trust_ratio)), [1.0, 1.0, 4.0])


# --- LARS --------------------------------------------------------------------------------------
def numpy_lars(params, grads, momentum, eta, beta, eps=0.0):
  """You, Gitman & Ginsburg 2017, Algorithm 1 (gamma_t inside the momentum), LayerNorm/biases
  excluded from decay and ratio."""
  w, vel = flat(params), {}
  for t, g in enumerate(grads):
    g = flat(g)
    for k in w:
      b = beta if is_decayed(k) else 0.0
      local = 1.0
      w_norm, g_norm = np.linalg.norm(w[k]), np.linalg.norm(g[k])
      if is_decayed(k) and w_norm > 0 and g_norm > 0:
        local = eta * w_norm / (g_norm + b * w_norm + eps)
      vel[k] = momentum * vel.get(k, 0.0) + lr_at(t) * local * (g[k] + b * w[k])
      w[k] = w[k] - vel[k]
  return w


def test_lars_matches_the_paper():
  params, grads = make_params(), gradient_sequence(make_params(), 6)
  tx = optim.lars(lr_at, momentum=0.9, trust_coefficient=0.02, weight_decay=0.05,
                  weight_decay_mask=optim.decay_mask)
  got, state = run_tx(tx, params, grads)
  want, fg = numpy_lars(params, grads, 0.9, 0.02, 0.05), flat(got)
  for k in want:
    np.testing.assert_allclose(fg[k], want[k], rtol=2e-5, atol=1e-7, err_msg=k)
  assert np.asarray(state[0].trust_ratio).shape == (2,)  # the two kernels


# --- hypergradient descent --------------------------------------------------------------------
SCALES = {"a": np.array([1.0, 2.0, 0.5]), "b": np.array([[0.3, 1.5], [1.0, 0.7]])}
TARGET = {"a": np.array([1.0, -1.0, 2.0]), "b": np.array([[0.5, 0.0], [-1.0, 1.0]])}


def quad_loss(theta):
  return sum(0.5 * np.sum(SCALES[k] * (np.asarray(theta[k], np.float64) - TARGET[k]) ** 2) for k in SCALES)


def quad_grad(theta):
  return {k: SCALES[k] * (np.asarray(theta[k], np.float64) - TARGET[k]) for k in SCALES}


def numpy_hd(kind, alpha0, beta, steps, momentum=0.0, per_tensor=False, b1=0.9, b2=0.999, eps=1e-8):
  """Baydin et al. 2018, Algorithm 1 (SGD-HD, SGDN-HD, Adam-HD) on the quadratic."""
  theta = {k: np.zeros_like(v) for k, v in TARGET.items()}
  alpha = {k: alpha0 for k in theta} if per_tensor else alpha0
  d_prev = {k: np.zeros_like(v) for k, v in theta.items()}
  vel, m, v = ({k: np.zeros_like(x) for k, x in theta.items()} for _ in range(3))
  alphas = []
  for t in range(1, steps + 1):
    g = quad_grad(theta)
    if per_tensor:
      alpha = {k: max(alpha[k] + beta * np.sum(g[k] * d_prev[k]), 1e-10) for k in theta}
    else:
      alpha = max(alpha + beta * sum(np.sum(g[k] * d_prev[k]) for k in theta), 1e-10)
    for k in theta:
      if kind == "sgd":
        vel[k] = momentum * vel[k] + g[k]
        d = g[k] + momentum * vel[k] if momentum else g[k]
      else:
        m[k] = b1 * m[k] + (1 - b1) * g[k]
        v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
        d = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      theta[k] = theta[k] - (alpha[k] if per_tensor else alpha) * d
      d_prev[k] = d
    alphas.append(np.mean(list(alpha.values())) if per_tensor else alpha)
  return theta, np.array(alphas)


def run_quadratic(tx, steps):
  theta = {k: jnp.zeros(v.shape, jnp.float32) for k, v in TARGET.items()}
  state, alphas = tx.init(theta), []
  update = jax.jit(tx.update)
  for _ in range(steps):
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), quad_grad(theta))
    u, state = update(g, state, theta)
    theta = optax.apply_updates(theta, u)
    alphas.append(float(optim.optimizer_metrics(state)["learning_rate"]))
  return theta, np.array(alphas)


@pytest.mark.parametrize("kind,alpha0,beta,momentum,per_tensor", [
    ("sgd", 0.05, 0.01, 0.0, False), ("sgd", 0.05, 0.01, 0.0, True), ("sgd", 0.03, 0.005, 0.5, False),
    ("adam", 0.02, 0.002, 0.0, False), ("adam", 0.02, 0.002, 0.0, True)])
def test_hypergradient_trajectory_matches_the_paper(kind, alpha0, beta, momentum, per_tensor):
  steps = 25
  if kind == "sgd":
    tx = optim.sgd_hd(alpha0, beta, momentum=momentum, per_tensor=per_tensor)
  else:
    tx = optim.adam_hd(alpha0, beta, per_tensor=per_tensor)
  theta, alphas = run_quadratic(tx, steps)
  want_theta, want_alphas = numpy_hd(kind, alpha0, beta, steps, momentum, per_tensor)
  np.testing.assert_allclose(alphas, want_alphas, rtol=2e-4)
  assert abs(alphas[-1] - alpha0) > 0.05 * alpha0  # the rate really moved
  assert_close(theta, want_theta, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("tx", [optim.sgd_hd(0.05, 0.01, momentum=0.5), optim.adam_hd(0.02, 0.002)],
                         ids=["sgdn_hd", "adam_hd"])
def test_hypergradient_equals_finite_difference_in_the_previous_rate(tx):
  theta = {k: jnp.zeros(v.shape, jnp.float32) for k, v in TARGET.items()}
  state = tx.init(theta)
  for _ in range(4):  # step t-1 is the last of these
    prev_theta, prev_state = theta, state
    u, state = tx.update(jax.tree.map(jnp.float32, quad_grad(theta)), state, theta)
    theta = optax.apply_updates(theta, u)
  _, new_state = tx.update(jax.tree.map(jnp.float32, quad_grad(theta)), state, theta)
  alpha, delta = float(state.learning_rate), 1e-2 * float(state.learning_rate)
  # u_{t-1} = -alpha d_{t-1}: the same step with alpha +- delta is u scaled by (alpha +- delta)/alpha.
  shifted = lambda s: {k: np.asarray(prev_theta[k], np.float64) + np.asarray(u[k], np.float64) * s
                       for k in TARGET}
  fd = (quad_loss(shifted(1 + delta / alpha)) - quad_loss(shifted(1 - delta / alpha))) / (2 * delta)
  np.testing.assert_allclose(float(new_state.hypergradient), fd, rtol=1e-3)
  del prev_state


def test_general_hypergradient_reproduces_sgd_hd_and_finite_differences_weight_decay():
  steps = 15
  general = optim.hypergradient_descent(optax.inject_hyperparams(optax.sgd)(learning_rate=0.05),
                                        {"learning_rate": 0.01})
  theta = {k: jnp.zeros(v.shape, jnp.float32) for k, v in TARGET.items()}
  state = general.init(theta)
  for _ in range(steps):
    u, state = general.update(jax.tree.map(jnp.float32, quad_grad(theta)), state, theta)
    theta = optax.apply_updates(theta, u)
  want_theta, want_alphas = numpy_hd("sgd", 0.05, 0.01, steps)
  np.testing.assert_allclose(float(state.inner_state.hyperparams["learning_rate"]), want_alphas[-1], rtol=2e-4)
  assert_close(theta, want_theta, rtol=2e-4, atol=1e-5)

  # AdamW's weight decay: h_t equals d loss(theta_{t-1}) / d wd_{t-1} by central differences.
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=0.05, weight_decay=0.3)
  tx = optim.hypergradient_descent(inner, {"weight_decay": 0.1}, bounds={"weight_decay": (0.0, 1.0)})
  theta = {k: jnp.asarray(v + 1.0, jnp.float32) for k, v in TARGET.items()}
  state = tx.init(theta)
  for _ in range(3):
    prev_theta, prev_inner = theta, state.inner_state
    g = jax.tree.map(jnp.float32, quad_grad(theta))
    u, state = tx.update(g, state, theta)
    theta = optax.apply_updates(theta, u)
  wd = float(state.inner_state.hyperparams["weight_decay"])

  def loss_with(wd_value):
    s = prev_inner._replace(hyperparams={**prev_inner.hyperparams, "weight_decay": jnp.float32(wd_value)})
    u_alt, _ = inner.update(g, s, prev_theta)
    return quad_loss({k: np.asarray(prev_theta[k], np.float64) + np.asarray(u_alt[k], np.float64)
                      for k in TARGET})

  fd = (loss_with(wd + 0.05) - loss_with(wd - 0.05)) / 0.1
  _, new_state = tx.update(jax.tree.map(jnp.float32, quad_grad(theta)), state, theta)
  np.testing.assert_allclose(float(new_state.hypergradients["weight_decay"]), fd, rtol=1e-3)
  assert "hd/weight_decay" in optim.optimizer_metrics(new_state)


# --- schedules ---------------------------------------------------------------------------------
def schedule_cfg(name, **kw):
  c = configs.base_config().schedule
  c.unlock()
  c.name = name
  c.update(kw)
  return c


def smith(t, base, peak, s, mode, gamma=1.0):
  """Smith 2017, §3.1 / his reference code, restated per step."""
  cycle = np.floor(1 + t / (2 * s))
  x = np.abs(t / s - 2 * cycle + 1)
  scale = {"triangular": 1.0, "triangular2": 1 / 2 ** (cycle - 1), "exp_range": gamma ** t}[mode]
  return base + (peak - base) * np.maximum(0, 1 - x) * scale


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cyclical_schedules_match_smith(mode):
  fn = schedules.make_schedule(schedule_cfg(mode, min_learning_rate=1e-4, cycle_steps=20, gamma=0.99),
                               1e-2, 200)
  t = np.arange(0, 200)
  np.testing.assert_allclose(np.asarray(jax.vmap(fn)(t)), smith(t, 1e-4, 1e-2, 20, mode, 0.99), rtol=1e-5)
  peak = {"triangular": 1e-2, "triangular2": 1e-2, "exp_range": 1e-4 + (1e-2 - 1e-4) * 0.99 ** 20}[mode]
  assert float(fn(20)) == pytest.approx(peak, rel=1e-5) and float(fn(40)) == pytest.approx(1e-4)
  assert float(fn(60)) == pytest.approx(1e-4 + (peak - 1e-4) * {"triangular": 1, "triangular2": 0.5,
                                                                "exp_range": 0.99 ** 40}[mode], rel=1e-5)


def test_onecycle_and_warmup_decays_match_closed_forms():
  T, peak, base = 100, 1e-2, 1e-4
  one = schedules.make_schedule(schedule_cfg("onecycle", min_learning_rate=base, pct_start=0.4,
                                             final_div_factor=10.0), peak, T)
  want = lambda t: (base + (peak - base) * t / 40 if t <= 40 else
                    peak - (peak - base) * (t - 40) / 40 if t <= 80 else base - (base - base / 10) * (t - 80) / 20)
  np.testing.assert_allclose([float(one(t)) for t in range(T + 1)], [want(t) for t in range(T + 1)], rtol=1e-5)
  W = 10
  poly = schedules.make_schedule(schedule_cfg("warmup_poly", warmup_steps=W, power=2.0,
                                              min_learning_rate=base), peak, T)
  for t in (0, 5, 10, 40, 99, 100):
    want = peak * t / W if t < W else base + (peak - base) * (1 - (t - W) / (T - W)) ** 2
    assert float(poly(t)) == pytest.approx(want, rel=1e-5)
  lin, alias = (schedules.make_schedule(schedule_cfg(n, warmup_steps=W), peak, T)
                for n in ("warmup_linear", "linear"))
  for t in (3, 10, 55, 100):
    want = peak * t / W if t < W else peak * (1 - (t - W) / (T - W))
    assert float(lin(t)) == pytest.approx(want, rel=1e-5) and float(alias(t)) == float(lin(t))
  cos = schedules.make_schedule(schedule_cfg("cosine", warmup_steps=0, min_learning_rate=base), peak, T)
  assert float(cos(T)) == pytest.approx(base) and float(cos(T // 2)) == pytest.approx((peak + base) / 2)


# --- config wiring -----------------------------------------------------------------------------
def tiny(**optimizer):
  c = spanlm.load_config(os.path.join(EXPERIMENTS, "span_bert.py:tiny"))
  for k, v in optimizer.items():
    group, key = k.split("__")
    c[group][key] = v
  return c


@pytest.mark.parametrize("field,value,message", [
    ("optimizer__name", "adagrad", "config.optimizer.name='adagrad'"),
    ("optimizer__b2", 1.0, "config.optimizer.b2=1.0 must be in [0, 1)"),
    ("optimizer__learning_rate", 0.0, "learning_rate"),
    ("schedule__name", "step", "config.schedule.name='step'"),
    ("optimizer__groups", ({"pattern": "("},), "config.optimizer.groups[0] pattern"),
    ("optimizer__groups", ({"pattern": "x", "lr": 1.0},), "unknown keys ['lr']"),
    ("schedule__min_learning_rate", 1.0, "config.schedule.min_learning_rate"),
])
def test_bad_config_is_named(field, value, message):
  with pytest.raises(ValueError, match=None) as e:
    configs.validate(tiny(**{field: value}))
  assert message in str(e.value)


def test_hypergradient_needs_a_constant_schedule_and_cyclical_a_base():
  with pytest.raises(ValueError, match="config.schedule.name=constant"):
    configs.validate(tiny(optimizer__name="sgd_hd"))
  with pytest.raises(ValueError, match="cycle's base LR"):
    configs.validate(tiny(schedule__name="triangular"))


def test_bad_masks_and_hyperparameters_fail_at_construction():
  params = make_params()
  with pytest.raises(ValueError, match="lamb: weight_decay_mask does not match"):
    optim.lamb(1e-3, weight_decay_mask={"dense": True}).init(params)
  with pytest.raises(ValueError, match="lars: trust_ratio_mask does not match"):
    optim.lars(1e-3, trust_ratio_mask={"nope": {"kernel": True}}).init(params)
  with pytest.raises(ValueError, match="lamb: b2=1.0"):
    optim.lamb(1e-3, b2=1.0)
  with pytest.raises(ValueError, match="adam_hd: learning_rate=-0.1"):
    optim.adam_hd(-0.1, 1e-7)
  c = tiny()
  c.optimizer.groups = ({"pattern": "^no_such_module/"},)
  tx, _ = optim.make_optimizer(c, 100)
  with pytest.raises(ValueError, match=r"groups\[0\] pattern '\^no_such_module/' matches no parameter"):
    tx.init(params)


def test_groups_apply_their_own_optimizer():
  params, grads = make_params(), gradient_sequence(make_params(), 3)
  c = tiny(optimizer__name="lamb", optimizer__grad_clip=0.0, optimizer__learning_rate=1e-3, optimizer__b2=0.999)
  c.schedule.warmup_steps = 0
  c.optimizer.groups = ({"pattern": "^out/", "label": "head", "name": "adamw", "learning_rate": 3e-2},
                        {"pattern": "^ln/", "name": "frozen"})
  configs.validate(c)
  tx, _ = optim.make_optimizer(c, 100)
  got, state = run_tx(tx, params, grads)
  np.testing.assert_array_equal(got["ln"]["scale"], params["ln"]["scale"])  # frozen
  head_alone = optax.adamw(optax.linear_schedule(3e-2, 0.0, 100), b1=0.9, b2=0.999, eps=1e-6,
                           weight_decay=0.01)
  assert_close({"out": got["out"]}, run_tx(head_alone, {"out": params["out"]}, [{"out": g["out"]} for g in grads])[0])
  lamb_alone = optim.lamb(optax.linear_schedule(1e-3, 0.0, 100), eps=1e-6, weight_decay=0.01,
                          weight_decay_mask=optim.decay_mask)
  sub = lambda t: {"dense": t["dense"]}
  assert_close(sub(got), run_tx(lamb_alone, sub(params), [sub(g) for g in grads])[0])
  metrics = optim.optimizer_metrics(state)
  assert metrics["head/learning_rate"] == pytest.approx(3e-2 * (1 - 2 / 100))
  assert {"default/learning_rate", "default/trust_ratio/mean"} <= metrics.keys()


@pytest.mark.slow
def test_trainer_runs_lamb_groups_with_accumulation_and_logs_trust_ratios():
  V, B, L = 1000, 16, 64
  word_table = np.zeros(V, bool)
  word_table[5:600] = True

  def make_batch(seed):
    ids = np.random.default_rng(seed).integers(5, V, size=(B, L)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 2, 3
    return {"input_ids": ids, "segment_ids": np.zeros_like(ids)}

  c = tiny(optimizer__name="lamb")
  c.train.batch_size, c.train.seq_len, c.train.grad_accum_steps = B, L, 2
  c.model.num_layers, c.model.hidden_size, c.model.num_heads, c.model.intermediate_size = 1, 32, 2, 64
  c.optimizer.groups = ({"pattern": "head", "label": "heads", "name": "adamw", "learning_rate": 2e-3},)
  mesh = spanlm.parallel.make_mesh(c.mesh, jax.devices()[:2])
  trainer = spanlm.Trainer(c, V, word_table, mesh)
  state = trainer.init_state()
  for i in range(2):
    state, m = trainer.train_step(state, spanlm.parallel.global_batch(make_batch(i), mesh))
  m = jax.device_get(m)
  assert np.isfinite(m["loss"])
  assert 0 < m["default/trust_ratio/min"] <= m["default/trust_ratio/max"]
  assert m["heads/learning_rate"] > 0 and m["default/learning_rate"] > 0
