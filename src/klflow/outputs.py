"""Output locations, checked before any work starts, and files written whole or not at all.

A command that would spend minutes training or scoring first makes sure it can put the result
where it was told to; a write that fails (a full disk) leaves no temporary file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from klflow.errors import KLFlowError


def check_output_file(path: Path, flag: str) -> None:
    """Raise unless `path` can be written as a file: not a folder, under a folder that can be written."""
    if path.is_dir():
        raise KLFlowError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise KLFlowError(f"{flag} {path} is not writable (permission denied)")
    _check_creatable(path.parent, path, flag)


def check_output_folder(path: Path, flag: str) -> None:
    """Raise unless `path` is, or can be made, a folder to write into."""
    if path.exists() and not path.is_dir():
        raise KLFlowError(f"{flag} {path} exists and is not a folder")
    _check_creatable(path, path, flag)


def write_atomic(file: Path, text: str) -> None:
    """Write `text` to a temporary file beside `file`, then rename it over `file`."""
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def describe_os_error(err: OSError) -> str:
    """One line for an OS error: what failed, and on which path."""
    paths = " -> ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
    reason = err.strerror or str(err)
    return f"{paths}: {reason}" if paths else reason


def _check_creatable(folder: Path, target: Path, flag: str) -> None:
    """`folder` exists as a writable folder, or its nearest existing ancestor is one."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise KLFlowError(f"{flag} {target} is under {existing}, which is a file, not a folder")
    try:
        # A real file, not os.access: a read-only mount denies writes that the permission bits allow.
        handle, probe = tempfile.mkstemp(prefix=".klflow-probe-", dir=existing)
    except OSError as err:
        raise KLFlowError(f"{flag} {target}: cannot write in {existing} ({err.strerror})") from None
    os.close(handle)
    os.unlink(probe)
