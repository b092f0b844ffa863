"""Reading a text corpus (the bundled chitchat conversations or local files) into documents."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from klflow.errors import KLFlowError

CHITCHAT = "chitchat"
_BINARY_PROBE_BYTES = 8192
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")  # one or more blank lines


@dataclass
class Corpus:
    """Documents of one corpus; `replaced_chars` counts undecodable bytes turned into U+FFFD."""

    name: str
    documents: list[str]
    replaced_chars: int


def load_corpus(source: str) -> Corpus:
    """Load "chitchat" or a local file/folder; documents are stripped and blank ones dropped."""
    if source == CHITCHAT:
        corpus = _load_chitchat()
    else:
        corpus = _load_path(Path(source).expanduser(), name=source)
    if not corpus.documents:
        raise KLFlowError(f"corpus {corpus.name} is empty")
    return corpus


def chitchat_version() -> str:
    """Installed version of the chitchat-dataset package (part of the corpus identity)."""
    _chitchat_json()  # fails with the install hint if the package is missing
    return importlib.metadata.version("chitchat-dataset")


def corpus_files(path: Path) -> list[Path]:
    """The files `load_corpus` reads for `path`: the file itself, or a folder's visible files, sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise KLFlowError(f"data path not found: {path}")
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _chitchat_json() -> Path:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or spec.origin is None:
        raise KLFlowError("the chitchat corpus needs its package: pip install chitchat-dataset")
    return Path(spec.origin).parent / "dataset.json"


def _load_chitchat() -> Corpus:
    with open(_chitchat_json(), encoding="utf-8") as f:
        conversations = json.load(f)
    documents = [
        "\n".join(" ".join(message["text"] for message in turn) for turn in conversation["messages"])
        for conversation in conversations.values()
    ]
    return Corpus(CHITCHAT, _clean(documents), replaced_chars=0)


def _load_path(path: Path, name: str) -> Corpus:
    if path.is_file():
        raw = path.read_bytes()
        if _is_binary(raw):
            raise KLFlowError(f"{path} is a binary file, not text")
        documents, replaced = _file_documents(path, raw, single=True)
        return Corpus(name, documents, replaced)

    documents: list[str] = []
    replaced = skipped = 0
    for file in corpus_files(path):
        raw = file.read_bytes()
        if _is_binary(raw):
            skipped += 1
            continue
        docs, n_replaced = _file_documents(file, raw, single=False)
        documents.extend(docs)
        replaced += n_replaced
    if skipped:
        print(f"warning: skipped {skipped} binary file(s) in {path}", file=sys.stderr)
    return Corpus(name, documents, replaced)


def _file_documents(path: Path, raw: bytes, single: bool) -> tuple[list[str], int]:
    """A .jsonl file gives one document per line; a lone text file one per paragraph; else one per file."""
    text, replaced = _decode(raw)
    if path.suffix == ".jsonl":
        return _clean(_jsonl_texts(path, text)), replaced
    if single:
        return _clean(_PARAGRAPH_BREAK.split(text)), replaced
    return _clean([text]), replaced


def _jsonl_texts(path: Path, text: str) -> list[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise KLFlowError(f"{path} line {number} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise KLFlowError(f'{path} line {number} has no string "text" field')
        texts.append(record["text"])
    return texts


def _is_binary(raw: bytes) -> bool:
    return b"\0" in raw[:_BINARY_PROBE_BYTES]


def _decode(raw: bytes) -> tuple[str, int]:
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd")


def _clean(documents: list[str]) -> list[str]:
    # Surrounding whitespace carries no content and would only blur document boundaries.
    return [d for d in (doc.strip() for doc in documents) if d]
