"""JSON-lines input: one JSON value per non-blank line, numbered for the user's error messages."""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from klflow.errors import KLFlowError


def json_lines(lines: Iterable[str], where: str) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value) of each non-blank line; a line that is not JSON raises
    KLFlowError("{where} line {number} is not valid JSON")."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            raise KLFlowError(f"{where} line {number} is not valid JSON") from None
        yield number, value
