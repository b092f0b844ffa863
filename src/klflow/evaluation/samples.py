"""Reading the JSON-lines files that `klflow sample --output` writes (or any with a "text" field)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klflow.data.corpus import replace_surrogates
from klflow.errors import KLFlowError
from klflow.jsonl import json_lines

# Per-sample payload, not generation settings.
_CONTENT_FIELDS = ("text", "ids")


@dataclass
class SampleSet:
    path: Path
    texts: list[str]
    records: list[dict[str, Any]]

    def settings(self) -> dict[str, Any]:
        """Each generation field (sampler, steps, nfe, seed, ...): its value, or a list when samples differ."""
        fields = dict.fromkeys(key for record in self.records for key in record if key not in _CONTENT_FIELDS)
        settings = {}
        for key in fields:
            values = list(dict.fromkeys(json.dumps(record.get(key), sort_keys=True) for record in self.records))
            decoded = [json.loads(value) for value in values]
            settings[key] = decoded[0] if len(decoded) == 1 else decoded
        return settings

    def token_length(self) -> int:
        """The samples' length in tokens of the generating model: "seq_len", else the length of "ids"."""
        lengths = Counter(record.get("seq_len") or len(record.get("ids") or ()) for record in self.records)
        if len(lengths) != 1 or 0 in lengths:
            shown = sorted(lengths, key=str)
            raise KLFlowError(f"{self.path}: the samples need one token length (a seq_len or ids field) for the data row; "
                              f"found {shown}")
        return int(next(iter(lengths)))

    def checkpoints(self) -> list[str]:
        return list(dict.fromkeys(str(r["checkpoint"]) for r in self.records if r.get("checkpoint")))


def is_samples_file(path: Path) -> bool:
    """Whether `path` looks written by klflow sample / infill: its first record has "text" and "method"."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        record = json.loads(first)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and "text" in record and "method" in record


def read_samples(path: str | Path, max_samples: int | None = None, kind: str = "samples") -> SampleSet:
    """The first `max_samples` (default all) records of a JSON-lines file; each needs a string "text"."""
    if max_samples is not None and max_samples < 1:
        raise KLFlowError(f"--max-samples must be >= 1, got {max_samples}")
    records = read_records(path, "text", kind, max_samples)
    return SampleSet(Path(path), [record["text"] for record in records], records)


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines prompts file: each needs a string "prompt"; a "reference" must be a string."""
    records = read_records(path, "prompt", "prompts")
    for number, record in enumerate(records, start=1):
        if not isinstance(record.get("reference", ""), str):
            raise KLFlowError(f'{path} record {number} has a "reference" that is not a string')
    return records


def read_records(path: str | Path, field: str, kind: str, max_records: int | None = None) -> list[dict[str, Any]]:
    """The first `max_records` (default all) JSON objects of a JSON-lines file, each with a string `field`."""
    path = Path(path)
    if not path.is_file():
        raise KLFlowError(f"{kind} file not found: {path}")
    records: list[dict[str, Any]] = []
    replaced = 0
    # utf-8-sig: a byte-order mark before the first record is not part of its JSON.
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for number, record in json_lines(handle, str(path)):
            if max_records is not None and len(records) >= max_records:
                break
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise KLFlowError(f'{path} line {number} has no string "{field}" field')
            record[field], count = replace_surrogates(record[field])
            replaced += count
            records.append(record)
    if replaced:
        print(f"warning: {replaced} lone surrogates in {path} were replaced by U+FFFD", file=sys.stderr)
    if not records:
        raise KLFlowError(f"{kind} file {path} has no texts")
    return records
