"""DESIGN principle 1: the core packages never import Lightning (only lightning_zobi.lightning does)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib, sys, types

class BlockLightning:
    def find_spec(self, name, path=None, target=None):
        if name == "lightning" or name.startswith(("lightning.", "pytorch_lightning")):
            raise ImportError(f"the core imported {{name}}")

sys.meta_path.insert(0, BlockLightning())
package = types.ModuleType("lightning_zobi")  # skip the top-level __init__, which loads the Lightning layer
package.__path__ = [{path!r}]
sys.modules["lightning_zobi"] = package
for name in {modules!r}:
    importlib.import_module(name)
"""

CORE = [
    "lightning_zobi.zo",
    "lightning_zobi.bilevel",
    "lightning_zobi.quant",
    "lightning_zobi.unlearn",
    "lightning_zobi.diffusion",
    "lightning_zobi.data.facts",
    "lightning_zobi.data.images",
]


def test_core_packages_import_without_lightning():
    code = PROBE.format(path=str(ROOT / "lightning_zobi"), modules=CORE)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _imports_of(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that a file imports anywhere (module level or inside functions)."""
    import ast

    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(package)}
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_no_import_circle_in_zo_or_quant():
    """STYLE: a rule does not import its accelerated variants; the backend is chosen above the rules.

    Counts lazy (function-level) imports too; package ``__init__`` files (which only re-export) are
    left out.
    """
    for package in ("lightning_zobi.zo", "lightning_zobi.quant"):
        folder = ROOT / Path(*package.split("."))
        files = [p for p in folder.rglob("*.py") if p.name != "__init__.py"]
        graph = {_module_name(p): {m for m in _imports_of(p, package)} for p in files}
        graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
        state: dict[str, int] = {}

        def visit(node: str, trail: list[str]) -> None:
            state[node] = 1
            for dep in sorted(graph[node]):
                if state.get(dep) == 1:
                    cycle = trail[trail.index(dep) :] + [dep] if dep in trail else [node, dep]
                    raise AssertionError(f"import circle in {package}: {' -> '.join(cycle)}")
                if dep not in state:
                    visit(dep, [*trail, dep])
            state[node] = 2

        for module in sorted(graph):
            if module not in state:
                visit(module, [module])


def test_no_module_over_the_size_limit_in_zo():
    """Issue 22: small modules with one job (the rule files, the base, the backends)."""
    limit = 450
    for path in (ROOT / "lightning_zobi" / "zo").rglob("*.py"):
        if path.name.startswith("fused"):
            continue  # the Triton kernels and their launch plans: split when they are next reworked
        assert len(path.read_text().splitlines()) <= limit, f"{path.name} is over {limit} lines"
