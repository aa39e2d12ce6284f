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
