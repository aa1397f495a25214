"""The package's import graph: no cycles, and leaf modules stay light.

The graph is read statically (ast) from every module under spanlm/, counting imports
at any depth (a function-level import is still a dependency), so a cycle is found
without importing anything. One subprocess checks that a leaf with no JAX in its own
imports (spanlm.tasks.rouge) does not drag JAX in through a package __init__.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spanlm")


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
  return out


def _graph(modules: dict[str, str]) -> dict[str, set[str]]:
  """module -> the spanlm modules it imports (`from pkg import sub` counts as pkg.sub)."""
  graph = {}
  for name, path in modules.items():
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      else:
        continue
      for t in targets:
        while t and t not in modules:  # `import spanlm.x.y` with y an attribute
          t = t.rpartition(".")[0]
        if t and t != name and t != "spanlm":  # the top package only re-exports lazily
          deps.add(t)
    graph[name] = deps
  return graph


def _find_cycle(graph):
  state, stack = {}, []

  def visit(n):
    state[n] = "open"
    stack.append(n)
    for d in sorted(graph[n]):
      if state.get(d) == "open":
        return stack[stack.index(d):] + [d]
      if d not in state:
        found = visit(d)
        if found:
          return found
    state[n] = "done"
    stack.pop()
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_graph_parser_sees_imports():
  graph = _graph(_modules())
  # Guards the parser itself: these edges exist in the code.
  assert "spanlm.objectives.masking" in graph["spanlm.objectives.pairs"]
  assert "spanlm.objectives.base" in graph["spanlm.train"]
  assert "spanlm.objectives.base" in graph["spanlm.configs"]  # a function-level import
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
  cycle = _find_cycle(_graph(_modules()))
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.slow
def test_leaf_module_does_not_load_jax():
  code = ("import sys, spanlm.tasks.rouge\n"
          "heavy = sorted(m for m in ('jax', 'flax', 'orbax', 'optax') if m in sys.modules)\n"
          "assert not heavy, heavy\n"
          "import spanlm\n"
          "assert callable(spanlm.load_config) and 'jax' in sys.modules\n")  # lazy re-exports work
  env = dict(os.environ, PYTHONPATH=os.path.dirname(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
