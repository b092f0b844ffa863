"""Run generated Python in a separate, resource-limited process, never in the evaluating one.

Each program runs in a fresh `python -I -S` child (isolated mode: no PYTHON* variables, no user
or site packages, so only the standard library) inside a new temporary directory that is its
working directory and HOME, with an empty environment apart from PATH. Before exec the child
gets rlimits: CPU seconds, address space, file size, no core files. A wall-clock timeout kills
the child's whole process group. A small runner first compiles the program (a syntax error is
reported as "not compiled"), replaces the Python-level network entry points of `socket` and
`_socket` with functions that raise, then executes the program and the tests in one namespace.
Only exit status 0 counts as passed.

Limits of this protection, honestly: it stops accidents (infinite loops, runaway memory, big
files, a test that tries to reach the network through Python's socket API), not an adversary.
Code can still call the OS directly (ctypes, os.system or subprocess starting another program
that opens sockets, reading files the user can read, writing outside the temp directory) and a
child that calls setsid escapes the group kill. Untrusted code at scale needs an OS sandbox:
a container or VM without network, a network namespace (`unshare -n`), nsjail, gVisor.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

NOT_COMPILED_EXIT = 97  # the runner's "did not compile" status; a program exiting 97 itself is counted the same
_STDERR_TAIL = 2000

_RUNNER = """
import socket, sys, _socket

def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the klflow sandbox")

for _module in (socket, _socket):
    for _name in ("socket", "socketpair", "fromfd", "create_connection", "create_server",
                  "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(_module, _name):
            setattr(_module, _name, _no_network)

program_path, tests_path, not_compiled = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    program = compile(open(program_path, encoding="utf-8").read(), "program.py", "exec")
except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
    sys.exit(not_compiled)
tests = compile(open(tests_path, encoding="utf-8").read(), "tests.py", "exec")
namespace = {"__name__": "__main__"}
exec(program, namespace)
exec(tests, namespace)
"""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20


@dataclass(frozen=True)
class SandboxResult:
    compiled: bool
    passed: bool
    status: str  # passed | failed | not_compiled | timeout | killed by <signal>
    returncode: int | None
    stderr_tail: str


def run_sandboxed(program: str, tests: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Compile and run `program`, then `tests` (e.g. asserts), in a limited child process."""
    with tempfile.TemporaryDirectory(prefix="klflow-sandbox-") as tmp:
        work = Path(tmp)
        (work / "runner.py").write_text(_RUNNER, encoding="utf-8")
        (work / "program.py").write_text(program, encoding="utf-8", errors="replace")
        (work / "tests.py").write_text(tests, encoding="utf-8", errors="replace")
        with open(work / "stdout", "wb") as stdout, open(work / "stderr", "wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-I", "-S", str(work / "runner.py"), str(work / "program.py"), str(work / "tests.py"),
                 str(NOT_COMPILED_EXIT)],
                cwd=work, env={"PATH": os.defpath, "HOME": str(work), "TMPDIR": str(work), "LC_ALL": "C.UTF-8"},
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                start_new_session=True, preexec_fn=lambda: _apply_limits(limits),
            )
            try:
                returncode: int | None = child.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                # Also reaps anything the program started in its group and left running.
                _kill_group(child.pid)
                child.wait()
        stderr_tail = (work / "stderr").read_bytes()[-_STDERR_TAIL:].decode("utf-8", "replace")
    return _result(returncode, stderr_tail)


def _apply_limits(limits: SandboxLimits) -> None:
    # Runs in the child between fork and exec; the limits hold for the program and its children.
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _result(returncode: int | None, stderr_tail: str) -> SandboxResult:
    if returncode is None:
        return SandboxResult(True, False, "timeout", None, stderr_tail)
    if returncode == NOT_COMPILED_EXIT:
        return SandboxResult(False, False, "not_compiled", returncode, stderr_tail)
    if returncode < 0:
        return SandboxResult(True, False, f"killed by {_signal_name(-returncode)}", returncode, stderr_tail)
    return SandboxResult(True, returncode == 0, "passed" if returncode == 0 else "failed", returncode, stderr_tail)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
