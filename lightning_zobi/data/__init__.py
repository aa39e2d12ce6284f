"""Data the package generates or that a dependency ships (no dataset hub)."""

from lightning_zobi.data.benchmarks import (
    load_muse,
    load_split,
    load_tofu,
    load_wmdp_corpus,
    load_wmdp_questions,
)

__all__ = ["load_muse", "load_split", "load_tofu", "load_wmdp_corpus", "load_wmdp_questions"]
