"""Peak memory of one stage (a training run, a sampling cell), measured the best way the device allows.

- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensors only, no cache).
- CPU on Linux: the process's peak resident set size VmHWM, reset to the current RSS by writing
  "5" to /proc/self/clear_refs at the start of the stage; it includes everything resident
  (Python, torch, an evaluator loaded earlier), so the RSS at the start is recorded beside it.
- Elsewhere: ru_maxrss, the process's high-water mark since it started, which no stage can reset.
"""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Yield a dict that holds the stage's peak memory in bytes and how it was measured, once the stage ends."""
    record: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield record
        record.update(kind="cuda_max_memory_allocated", peak_bytes=torch.cuda.max_memory_allocated(device))
        return
    at_start = _status_bytes("VmRSS")
    if at_start is not None and _reset_peak_rss():
        yield record
        record.update(kind="linux_peak_rss_of_stage", peak_bytes=_status_bytes("VmHWM"), rss_at_start_bytes=at_start)
        return
    yield record
    record.update(kind="ru_maxrss_process_high_water", peak_bytes=_ru_maxrss_bytes(),
                  note="the process's peak RSS since it started, not this stage's alone")


def describe(record: dict[str, Any]) -> str:
    """A short human reading of a peak_memory record, e.g. '1.23 GB (peak RSS, 0.80 GB at start)'."""
    if not record:
        return "n/a"
    peak = f"{record['peak_bytes'] / 1e9:.2f} GB"
    if record["kind"] == "cuda_max_memory_allocated":
        return f"{peak} (CUDA max allocated)"
    if record["kind"] == "linux_peak_rss_of_stage":
        growth = (record["peak_bytes"] - record["rss_at_start_bytes"]) / 1e9
        return f"{peak} (peak RSS, +{growth:.2f} GB over the stage's start)"
    return f"{peak} (process ru_maxrss high-water mark)"


def _reset_peak_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        return None
    return None


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
