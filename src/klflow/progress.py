"""Progress on stderr: a tqdm bar on a terminal, a plain line every half minute anywhere else.

A bar redraws itself with carriage returns, which a log file (a cluster job's, `2> log`) keeps as
one ever-growing line; the plain lines stay readable there.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any, TextIO

from tqdm import tqdm

LINE_INTERVAL_SECONDS = 30.0


def progress_bar(total: float | None, desc: str, unit: str = "it", disable: bool = False, initial: float = 0,
                 unit_scale: bool = False, file: TextIO | None = None, interval: float = LINE_INTERVAL_SECONDS,
                 **bar_options: Any) -> tqdm | ProgressLines:
    """A tqdm bar (bar_options go to it) when `file` (default stderr) is a terminal, else ProgressLines."""
    file = sys.stderr if file is None else file
    if disable or _is_terminal(file):
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, initial=initial, unit_scale=unit_scale,
                    file=file, **bar_options)
    return ProgressLines(total, desc, unit, initial, unit_scale, file, interval)


def _is_terminal(file: TextIO) -> bool:
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


class ProgressLines:
    """The part of tqdm's interface klflow uses (update, set_postfix, write, close, n), printed as a line
    every `interval` seconds of progress and once at the end, e.g.
    'train: 120/1000 step (12%), 0:01:02 elapsed, step=120, loss=3.210'."""

    def __init__(self, total: float | None, desc: str, unit: str, initial: float, unit_scale: bool, file: TextIO,
                 interval: float) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.unit_scale = unit_scale
        self.file = file
        self.interval = interval
        self.postfix: dict[str, Any] = {}
        self._started = self._printed = time.monotonic()
        self._closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._printed >= self.interval:
            self._printed = now
            self.write(self.line())

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def write(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def line(self) -> str:
        """The progress so far in words."""
        done = self._amount(self.n)
        if self.total:
            done += f"/{self._amount(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            done += f" {self.unit}"
        elapsed = timedelta(seconds=round(time.monotonic() - self._started))
        extra = "".join(f", {key}={value}" for key, value in self.postfix.items())
        return f"{self.desc}: {done}, {elapsed} elapsed{extra}"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.write(self.line())

    def _amount(self, value: float) -> str:
        return tqdm.format_sizeof(value) if self.unit_scale else f"{round(value):,}"

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, error_type: type | None, *_: object) -> None:
        if error_type is None:  # a failure is reported by its own message, not by a last progress line
            self.close()
        self._closed = True
