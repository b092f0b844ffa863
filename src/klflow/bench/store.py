"""The bench's cache on disk: every finished piece of work is one file, written atomically.

A file that exists is finished work; a run that is interrupted leaves at most a temp file, which
the next run ignores and overwrites.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from klflow.errors import KLFlowError


def write_text_atomic(file: Path, text: str) -> None:
    """Write text to a temp file beside `file`, then rename it into place."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(file)


def write_json(file: Path, value: Any) -> None:
    write_text_atomic(file, json.dumps(value, indent=2) + "\n")


def read_json(file: Path) -> Any | None:
    """The JSON in `file`, or None when it does not exist."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KLFlowError(f"{file} is not valid JSON; delete it to redo that part of the bench") from None


def write_jsonl(file: Path, records: list[dict[str, Any]]) -> None:
    write_text_atomic(file, "".join(json.dumps(record) + "\n" for record in records))
