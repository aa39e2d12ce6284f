"""Data the package generates or that a dependency ships (no dataset hub)."""
