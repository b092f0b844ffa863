"""Number formatting shared by the bench's tables."""

from __future__ import annotations

from typing import Any

from klflow.evaluation.mauve import mauve_tied


def fmt(value: float | None, digits: int) -> str:
    """A number with `digits` decimals, or n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def mauve_range(row: dict[str, Any]) -> tuple[float, float] | None:
    """A row's MAUVE (min, max) over k-means seeds; a point for rows written before the range was kept."""
    if row["mauve"] is None:
        return None
    low, high = row.get("mauve_range") or (row["mauve"], row["mauve"])
    return low, high


def fmt_mauve(row: dict[str, Any]) -> str:
    """A row's MAUVE as its mean with the min-max range over k-means seeds (the mean alone for old rows)."""
    if row["mauve"] is None or row.get("mauve_range") is None:
        return fmt(row["mauve"], 3)
    low, high = row["mauve_range"]
    return f"{row['mauve']:.3f} ({low:.3f}-{high:.3f})"


def mauve_ranking(rows: list[dict[str, Any]]) -> list[str]:
    """For each row, in order: "best" for the one of highest MAUVE, "tied" for each other whose range over
    k-means seeds overlaps the best's (no difference), "" for the rest and for rows without MAUVE."""
    scored = [row for row in rows if row["mauve"] is not None]
    if not scored:
        return [""] * len(rows)
    best = max(scored, key=lambda row: row["mauve"])
    return ["best" if row is best else "tied" if row["mauve"] is not None and mauve_tied(mauve_range(row), mauve_range(best))
            else "" for row in rows]


def fmt_ranked_mauve(row: dict[str, Any], mark: str) -> str:
    """fmt_mauve, in bold for the best of a comparison and followed by = where tied with it."""
    text = fmt_mauve(row)
    return f"**{text}**" if mark == "best" else f"{text} =" if mark == "tied" else text
