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


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each process's rows into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
