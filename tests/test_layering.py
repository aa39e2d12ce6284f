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
    """Modules of ``package`` that a file imports anywhere (module level or inside functions).

    ``from a.b import c`` counts ``a.b`` and ``a.b.c`` (``c`` may be a submodule).
    """
    import ast

    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(package)}
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> modules it imports) as a path, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return trail[trail.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep, [*trail, dep])):
                return found
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module, [module])):
            return found
    return None


def test_no_import_circle_in_zo_or_quant():
    """STYLE: a rule does not import its accelerated variants; the backend is chosen above the rules.

    Counts lazy (function-level) imports too; package ``__init__`` files (which only re-export) are
    left out.
    """
    for package in ("lightning_zobi.zo", "lightning_zobi.quant"):
        folder = ROOT / Path(*package.split("."))
        files = [p for p in folder.rglob("*.py") if p.name != "__init__.py"]
        graph = {_module_name(p): _imports_of(p, package) for p in files}
        graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
        circle = _circle(graph)
        assert circle is None, f"import circle in {package}: {' -> '.join(circle or [])}"
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the search finds one


def test_no_module_over_the_size_limit_in_zo():
    """Issue 22: small modules with one job (the rule files, the base, the backends, each fused family)."""
    limit = 420
    for path in (ROOT / "lightning_zobi" / "zo").rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= limit, f"{path.relative_to(ROOT)} has {lines} lines, over {limit}: split it by family"


def test_the_backend_is_chosen_above_the_rules():
    """STYLE: only the backend layer (and the fused code itself) imports the fused Triton path.

    A rule, the base or a strategy never imports its accelerated variant, so the torch path stays
    importable and readable without Triton, and a new backend is one file plus one line in
    ``zo/backends.py`` (``quant/backends.py`` for QZO).
    """
    fused = ("lightning_zobi.zo.fused", "lightning_zobi.quant.qzo_fused")
    allowed = {
        "lightning_zobi.zo",  # re-exports the public fused classes
        "lightning_zobi.zo.backends",
        "lightning_zobi.quant.backends",
        "lightning_zobi.quant.qzo_fused",
    }
    for path in (ROOT / "lightning_zobi").rglob("*.py"):
        module = _module_name(path)
        if module in allowed or module.startswith("lightning_zobi.zo.fused"):
            continue
        found = {m for m in _imports_of(path, "lightning_zobi") if m.startswith(fused)}
        assert not found, f"{module} imports {sorted(found)}: choose the backend in zo/backends.py instead"
