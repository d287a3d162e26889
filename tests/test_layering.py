"""The import layering of DESIGN.md: the pure packages never reach Lightning or the layers above them.

``ldm.nn``, ``ldm.diffusion``, ``ldm.autoencoder``, ``ldm.contrastive`` and ``ldm.metrics`` are plain
torch. The test follows every import statement of every module (also those inside functions, which
run later: a lazy import is still an import), through ``ldm``'s own modules and their packages'
``__init__``, and fails on a path to Lightning or to ``ldm.systems`` / ``ldm.pipelines`` /
``ldm.callbacks`` / ``ldm.tools`` / ``ldm.cli``, printing the chain. Before issue 15 there was one
circle of 11 files: the frozen-stage wrappers loaded runs through ``ldm.systems.loading``, and
``ldm.systems.prior`` took its noise levels from ``ldm.pipelines``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

from tests.conftest import REPO

PURE = ["ldm.nn", "ldm.diffusion", "ldm.autoencoder", "ldm.contrastive", "ldm.metrics"]
ABOVE = ("ldm.systems", "ldm.pipelines", "ldm.callbacks", "ldm.tools", "ldm.cli")
LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """module -> the modules its import statements name (ldm ones resolved, others by their top name)."""
    modules = {_module_name(p): p for p in (REPO / "ldm").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (path.name == "__init__.py" and not name.startswith(tuple(PURE)) and isinstance(node, ast.FunctionDef)
                    and node.name == "__getattr__"):
                for inner in ast.walk(node):  # a PEP 562 lazy export of a package outside the pure ones (ldm.data's
                    inner._lazy_export = True  # ShardDataModule) runs only when that name is used
        for node in ast.walk(tree):
            if getattr(node, "_lazy_export", False):
                continue
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in found:
                if target.startswith("ldm"):
                    # importing ldm.a.b runs ldm/__init__, ldm/a/__init__ and ldm/a/b
                    pieces = target.split(".")
                    targets |= {".".join(pieces[:i]) for i in range(2, len(pieces) + 1)} & set(modules)
                else:
                    targets.add(target.split(".")[0])
        graph[name] = targets
    return graph


def _forbidden_path(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    seen, queue = {start: None}, deque([start])
    while queue:
        current = queue.popleft()
        for nxt in sorted(graph.get(current, ())):
            if nxt in seen:
                continue
            seen[nxt] = current
            if nxt.startswith(ABOVE) or nxt in LIGHTNING:
                chain, node = [nxt], current
                while node is not None:
                    chain.append(node)
                    node = seen[node]
                return chain[::-1]
            if nxt.startswith("ldm"):
                queue.append(nxt)
    return None


@pytest.mark.parametrize("package", PURE)
def test_a_pure_package_reaches_neither_lightning_nor_the_layers_above(package):
    graph = _graph()
    for module in sorted(m for m in graph if m == package or m.startswith(package + ".")):
        chain = _forbidden_path(module, graph)
        assert chain is None, " -> ".join(chain)


def test_importing_the_pure_packages_loads_no_lightning():
    code = ("import sys; import " + ", ".join(PURE) + "; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', "
            "'lightning_fabric') or m.startswith(('ldm.systems', 'ldm.pipelines'))); print(bad); "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
