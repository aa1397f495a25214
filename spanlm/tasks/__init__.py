"""Fine-tuning tasks by name (see `spanlm.tasks.base.Task` for the interface).

GLUE tasks live in `glue.py`; any other name `foo` is looked up as the module
`spanlm.tasks.foo`, which must define `make_task(config) -> Task`.
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


def get_task(name: str, config) -> Task:
  from spanlm.tasks import glue

  key = name.lower().replace("-", "")
  if key in glue.TASKS:
    return glue.make_task(key, config)
  try:
    module = importlib.import_module(f"spanlm.tasks.{key}")
  except ModuleNotFoundError as e:
    if e.name != f"spanlm.tasks.{key}":
      raise
    raise ValueError(f"unknown config.task.name={name!r}; choose a GLUE task {sorted(glue.TASKS)} "
                     f"or a module in spanlm/tasks/ (e.g. squad, bertsum)") from None
  return module.make_task(config)


__all__ = ["Features", "Task", "get_task"]
