"""Mesh, logical-axis rules and shardings: the only place that names devices.

Parameters carry logical axis names (see `spanlm.models.bert`); `RULES` maps
them onto the mesh axes `data`, `fsdp` and `model` (maxtext's convention):
- `data`: pure data parallelism (parameters replicated);
- `fsdp`: data parallelism with parameters and optimizer state sharded along `embed`;
- `model`: tensor parallelism over heads, the FFN hidden dimension and the vocabulary.
Changing parallelism is a config change (`config.mesh.*`), never a model change.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("heads", "model"),
    ("mlp", "model"),
    ("embed", "fsdp"),
    ("embed_in", None),
    ("embed_out", None),
    ("kv", None),
    ("pos", None),
    ("type", None),
    ("length", None),
    # Hidden states between layers (models.bert.ACTIVATION_AXES): rows over the data axes.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolve `config.mesh` (one axis may be -1 = all remaining devices)."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.model)]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got data/fsdp/model={sizes}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices are not divisible by {known} "
                       f"(data/fsdp/model={sizes})")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh data*fsdp*model = {math.prod(sizes)} but {num_devices} devices are "
        f"available; set one axis to -1 to use all remaining devices")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: shardings are propagated by the compiler from the inputs' and
  # outputs' NamedShardings (jax.make_mesh defaults to Explicit axes now).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("spanlm_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
  """Inside (while tracing the model), `constrain` pins activations to `mesh`.

  Without the constraints XLA may shard the embedding gather's output along
  `fsdp` (like the table) and then fully rematerialise it to batch sharding.
  A context variable rather than a global mesh: flax would also constrain
  every parameter it unboxes under a global mesh.
  """
  token = _ACTIVATION_MESH.set(mesh)
  try:
    yield
  finally:
    _ACTIVATION_MESH.reset(token)


def constrain(x, logical_axes: tuple[str, ...]):
  """Sharding constraint on an activation by logical axis names; a no-op outside `activation_sharding`."""
  mesh = _ACTIVATION_MESH.get()
  return x if mesh is None else nn.with_logical_constraint(x, logical_axes, rules=RULES, mesh=mesh)


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree of `nn.Partitioned` (abstract) values."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over data x fsdp, sequence replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_rows(mesh: Mesh, global_batch_size: int) -> np.ndarray:
  """The global row indices (ascending) that this process's devices hold of a batch.

  Derived from the batch sharding itself, so it is right for any mesh: with
  `model` (or any replicating axis) spanning processes, replica processes get
  identical rows; with `data`/`fsdp` spanning them, disjoint ones. The data
  pipeline loads exactly these rows (`pipeline.train_iterator(rows=...)`).
  """
  sharding = batch_sharding(mesh)
  dp = data_parallel_size(mesh)
  if global_batch_size % dp:
    raise ValueError(f"a batch of {global_batch_size} rows cannot be split over the {dp} data-parallel "
                     f"devices (mesh data x fsdp); pick a multiple of {dp}")
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  rows = set()
  for index in index_map.values():
    rows.update(range(*index[0].indices(global_batch_size)))
  return np.array(sorted(rows), dtype=np.int64)


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh,
                 global_batch_size: int | None = None) -> dict[str, jax.Array]:
  """Global arrays, sharded over the batch axes, from the rows this process holds.

  `batch` holds either the rows `batch_rows(mesh, global_batch_size)` of the
  global batch, in that order (what the training pipeline loads), or, with
  `global_batch_size=None`, the whole global batch (on every process; each
  process places only its own rows). The global shape is always explicit, so
  a wrong number of rows is an error, never a silently smaller batch.
  """
  if not batch:
    return {}
  sharding = batch_sharding(mesh)
  n = len(next(iter(batch.values())))
  if global_batch_size is None:
    global_batch_size, rows = n, None
  else:
    rows = batch_rows(mesh, global_batch_size)
    if n != len(rows):
      raise ValueError(f"this process holds {n} rows of the global batch of {global_batch_size}, but its "
                       f"devices hold {len(rows)} (rows from parallel.batch_rows)")
    if len(rows) == global_batch_size:
      rows = None  # this process holds the whole batch (one process, or batch replicated over processes)

  def local_slice(index):
    sl = index[0]
    if rows is None:
      return sl
    start, stop, _ = sl.indices(global_batch_size)
    first = int(np.searchsorted(rows, start))
    return slice(first, first + stop - start)

  def one(v):
    v = np.asarray(v)
    shape = (global_batch_size,) + v.shape[1:]
    return jax.make_array_from_callback(shape, sharding, lambda index: v[(local_slice(index),) + index[1:]])

  return {k: one(v) for k, v in batch.items()}
