"""Fine-tuning tasks by name (see `spanlm.tasks.base.Task` for the interface).

GLUE tasks live in `glue.py`; any other name `foo` is looked up as the module
`spanlm.tasks.foo`, which must define `make_task(config) -> Task` and may define
`extend_config(config)` (declaring its config group, e.g. config.squad, with every
default and comment: the one place it is declared) and `validate_config(config)`.
"""

from __future__ import annotations

import importlib

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from spanlm.tasks.base import Features, Task


def __getattr__(name):  # lazy, so `import spanlm.tasks.rouge` does not load Flax (PEP 562)
  if name in ("Features", "Task"):
    from spanlm.tasks import base
    return getattr(base, name)
  raise AttributeError(f"module 'spanlm.tasks' has no attribute {name!r}")


def _module(name: str):
  """The module defining task `name` (glue for the GLUE tasks)."""
  from spanlm.tasks import glue

  key = name.lower().replace("-", "")
  if key in glue.TASKS:
    return glue
  try:
    return importlib.import_module(f"spanlm.tasks.{key}")
  except ModuleNotFoundError as e:
    if e.name != f"spanlm.tasks.{key}":
      raise
    raise ValueError(f"unknown config.task.name={name!r}; choose a GLUE task {sorted(glue.TASKS)} "
                     f"or a module in spanlm/tasks/ (e.g. squad, bertsum)") from None


def get_task(name: str, config) -> Task:
  module = _module(name)
  key = name.lower().replace("-", "")
  return module.make_task(key, config) if module.__name__.endswith(".glue") else module.make_task(config)


def extend_config(config, name: str) -> None:
  """Add task `name`'s own config group (declared in its module) to a fine-tuning config."""
  extend = getattr(_module(name), "extend_config", None)
  if extend is not None:
    extend(config)


def validate_config(config) -> None:
  """The task's own checks of its config group (before anything is built)."""
  check = getattr(_module(config.task.name), "validate_config", None)
  if check is not None:
    check(config)


__all__ = ["Features", "Task", "extend_config", "get_task", "validate_config"]
