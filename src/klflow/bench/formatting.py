"""Number formatting shared by the bench's tables."""

from __future__ import annotations


def fmt(value: float | None, digits: int) -> str:
    """A number with `digits` decimals, or n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"
