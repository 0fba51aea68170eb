"""The import graph between velodiff's subpackages has no circle, and loading/ and pipelines/ never import quant/.

Every ``import`` statement in the package's source is read with ``ast`` (module level and inside functions alike:
a function-level import hides a circle from Python, not from this test) and mapped to the subpackage (or
top-level module) it names. A quantized folder still loads when nobody imported ``velodiff.quant``: the loader
registry imports the modules it names on its first lookup (checked in a fresh interpreter).
"""
import ast
import os
import subprocess
import sys
from collections import defaultdict

import velodiff

ROOT = os.path.dirname(os.path.abspath(velodiff.__file__))


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, module: str):
    """Every velodiff module that the file at ``path`` (module ``module``) imports, with the line."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # ``from velodiff import quant`` imports the subpackage velodiff.quant
                sub = f"{target}.{alias.name}"
                yield (sub if _exists(sub) else target), node.lineno


def _node(module: str) -> str:
    """The graph node of a velodiff module: its subpackage or top-level module (``velodiff`` for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "velodiff"


def _exists(module: str) -> bool:
    base = os.path.join(os.path.dirname(ROOT), *module.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py")) or module == "velodiff._C"


def subpackage_graph():
    """{node: {imported node: [(file, line), ...]}} over every velodiff source file."""
    graph = defaultdict(lambda: defaultdict(list))
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = _module_name(path)
            for target, line in _imports(path, module):
                if not target or not target.split(".")[0] == "velodiff" or not _exists(target):
                    continue
                a, b = _node(module), _node(target)
                if a != b:
                    graph[a][b].append((os.path.relpath(path, ROOT), line))
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in list(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walker_sees_imports_of_every_form():
    """The graph is not vacuous: it holds edges known to exist, found through each import form."""
    graph = subpackage_graph()
    assert "loading" in graph["quant"]  # quant/checkpoint.py: from velodiff.loading.folders import ...
    assert "models" in graph["loading"]  # loading/modules.py: the model registry
    assert "commands" in graph["cli"] and "pipelines" in graph["commands"] and "loading" in graph["pipelines"]
    assert "ops" in graph["sampling"]  # sampling/plan.py: ``from velodiff import ops`` inside a function


def test_subpackage_import_graph_is_acyclic():
    graph = subpackage_graph()
    cycle = _find_cycle(graph)
    if cycle:
        where = "; ".join(f"{a} -> {b} at {graph[a][b][0][0]}:{graph[a][b][0][1]}" for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(f"import circle {' -> '.join(cycle)} ({where})")


def test_loading_and_pipelines_never_import_quant():
    graph = subpackage_graph()
    for node in ("loading", "pipelines", "models"):
        assert "quant" not in graph[node], (node, graph[node]["quant"])


def test_loader_registry_imports_quant_by_name_in_a_fresh_interpreter():
    """``velodiff.loading`` knows the quantized-folder loader without anyone importing velodiff.quant first."""
    code = ("import sys; from velodiff.loading import registry; assert 'velodiff.quant' not in sys.modules; "
            "print(sorted(registry.folder_loaders())); assert 'velodiff.quant' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "velodiff-quantized" in out.stdout
