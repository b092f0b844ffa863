"""Documents and prompt -> response pairs, read as a stream from local text, JSONL and Parquet files."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from klflow.errors import KLFlowError
from klflow.jsonl import json_lines

_BINARY_PROBE_BYTES = 8192
_PARQUET_BATCH_ROWS = 1024
_SLUG = re.compile(r"[^A-Za-z0-9_-]+")
# JSON's \uD800 escapes decode to lone surrogates, which no tokenizer (nor UTF-8) can take.
_SURROGATE = re.compile("[\ud800-\udfff]")
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class Example(NamedTuple):
    """One document, or the response of a pair whose `prompt` is given."""

    text: str
    prompt: str | None = None


@dataclass(frozen=True)
class SourceOptions:
    """Which record fields hold the text (or the prompt and response), and which HF config/split to read.

    A field may be a dotted path into nested records, e.g. "translation.de".
    """

    text_field: str = "text"
    prompt_field: str | None = None
    response_field: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"

    def __post_init__(self) -> None:
        if (self.prompt_field is None) != (self.response_field is None):
            raise KLFlowError("prompt/response pairs need both --prompt-field and --response-field")

    @property
    def pairs(self) -> bool:
        return self.prompt_field is not None

    def fields(self) -> list[str]:
        """The fields read: prompt and response, or the text."""
        if self.prompt_field is not None and self.response_field is not None:
            return [self.prompt_field, self.response_field]
        return [self.text_field]


@dataclass
class ReadStats:
    """What a pass over a source had to repair or skip; reset at the start of every pass."""

    replaced_chars: int = 0
    skipped_files: int = 0


@dataclass
class Source:
    """A corpus that can be read several times, each time as a fresh stream of examples."""

    name: str
    identity: dict[str, Any]  # what the examples are made of; when it changes, cached shards are stale
    read: Callable[[ReadStats], Iterator[Example]]
    pairs: bool = False
    separator: str = ""  # tokenized between a pair's prompt and its response
    stats: ReadStats = field(default_factory=ReadStats)

    def examples(self) -> Iterator[Example]:
        """A new pass over the corpus; `stats` counts what this pass repaired."""
        self.stats = ReadStats()
        return self.read(self.stats)

    def warn(self) -> None:
        """Report on stderr what the last pass repaired or skipped."""
        if self.stats.skipped_files:
            print(f"warning: skipped {self.stats.skipped_files} binary file(s) in {self.name}", file=sys.stderr)
        if self.stats.replaced_chars:
            print(f"warning: {self.stats.replaced_chars} undecodable bytes in {self.name} were replaced by U+FFFD "
                  "(lone surrogates count among them)", file=sys.stderr)


def path_source(path: Path, options: SourceOptions) -> Source:
    """A local text file (one document per paragraph), JSONL or Parquet file, or a folder of them."""
    files = corpus_files(path)
    stats = [file.stat() for file in files]
    identity = {
        "path": str(path.resolve()),
        "n_files": len(stats),
        "n_bytes": sum(s.st_size for s in stats),
        # The bytes themselves: an edit that keeps size and mtime (rsync -a, cp -p) still shows.
        "sha256": content_digest(files),
        "fields": options.fields(),
    }
    single = path.is_file()

    def read(stats: ReadStats) -> Iterator[Example]:
        for file in files:
            yield from _file_examples(file, options, stats, single)

    return Source(str(path), identity, read, pairs=options.pairs)


def corpus_files(path: Path) -> list[Path]:
    """The files read for `path`: the file itself, or a folder's visible files, sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise KLFlowError(f"data path not found: {path}")
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def content_digest(files: list[Path]) -> str:
    """sha256 of the files' names and bytes, read in blocks."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def replace_surrogates(text: str) -> tuple[str, int]:
    """text with every lone surrogate replaced by U+FFFD, and how many there were."""
    return _SURROGATE.subn("\ufffd", text)


def options_digest(source: str, options: SourceOptions) -> str:
    """Short hash telling apart sources of the same name read differently or living in different places."""
    key = json.dumps([source, asdict(options)], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def record_example(record: Any, options: SourceOptions, where: str) -> Example | None:
    """The example held by one JSON/Parquet/HF record; None when its text is blank."""
    values = [_field(record, name, where) for name in options.fields()]
    return clean_pair(*values) if options.pairs else clean_document(*values)


def clean_document(text: str) -> Example | None:
    # Surrounding whitespace carries no content and would only blur document boundaries.
    text = text.strip()
    return Example(text) if text else None


def clean_pair(prompt: str, response: str) -> Example | None:
    # Not stripped: in code (HumanEval) the response's leading indentation is part of the program.
    return Example(response, prompt) if prompt.strip() and response.strip() else None


def decode(raw: bytes, stats: ReadStats) -> str:
    """UTF-8 text of `raw`, undecodable bytes replaced by U+FFFD and counted in `stats`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        stats.replaced_chars += text.count("\ufffd") - raw.count("\ufffd".encode())
        return text


def _is_binary(raw: bytes) -> bool:
    return b"\0" in raw[:_BINARY_PROBE_BYTES]


def _is_utf16(raw: bytes) -> bool:
    """A UTF-16 byte-order mark, or mostly-ASCII text with a NUL in every other byte."""
    probe = raw[:_BINARY_PROBE_BYTES]
    halves = probe[0::2], probe[1::2]
    return probe.startswith(_UTF16_BOMS) or (len(probe) >= 4 and any(h.count(0) == len(h) for h in halves))


def _open_bytes(path: Path):
    """The file's bytes, decompressed when it ends in .gz."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _kind(path: Path) -> str:
    """The suffix that says how to read `path`: .jsonl, .parquet, or anything else (text); .gz looked through."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _file_examples(path: Path, options: SourceOptions, stats: ReadStats, single: bool) -> Iterator[Example]:
    """A .jsonl file gives one example per line, a .parquet file one per row; a lone text file one per
    paragraph; a text file in a folder one document."""
    if path.suffix == ".parquet":
        yield from _parquet_examples(path, options)
        return
    try:
        with _open_bytes(path) as f:
            head = f.read(_BINARY_PROBE_BYTES)
    except (gzip.BadGzipFile, EOFError):
        raise KLFlowError(f"{path} is not a readable gzip file") from None
    if _is_utf16(head):
        raise KLFlowError(f"{path} is UTF-16 text; klflow reads UTF-8: convert it (iconv -f UTF-16 -t UTF-8)")
    if _is_binary(head):
        if single:
            raise KLFlowError(f"{path} is a binary file, not text")
        stats.skipped_files += 1
        return
    if _kind(path) == ".jsonl":
        yield from _jsonl_examples(path, options, stats)
    elif options.pairs:
        raise KLFlowError(f"{path} is plain text; prompt/response pairs need JSONL or Parquet records")
    elif single:
        yield from _examples(_paragraphs(_lines(path, stats)))
    else:
        yield from _examples(["".join(_lines(path, stats))])


def _lines(path: Path, stats: ReadStats) -> Iterator[str]:
    # Decoding line by line is exact: a newline byte never occurs inside a multi-byte UTF-8 character.
    with _open_bytes(path) as f:
        for number, raw in enumerate(f):
            # A byte-order mark says "UTF-8"; it is not the first character of the first document.
            yield decode(raw[3:] if number == 0 and raw.startswith(b"\xef\xbb\xbf") else raw, stats)


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Runs of lines separated by blank (whitespace-only) lines."""
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph)
            paragraph = []
    if paragraph:
        yield "".join(paragraph)


def _examples(texts: Iterable[str]) -> Iterator[Example]:
    for text in texts:
        example = clean_document(text)
        if example is not None:
            yield example


def _jsonl_examples(path: Path, options: SourceOptions, stats: ReadStats) -> Iterator[Example]:
    for number, record in json_lines(_lines(path, stats), str(path)):
        example = record_example(record, options, f"{path} line {number}")
        if example is not None:
            text, replaced = replace_surrogates(example.text)
            prompt, in_prompt = replace_surrogates(example.prompt) if example.prompt is not None else (None, 0)
            stats.replaced_chars += replaced + in_prompt
            yield Example(text, prompt)


def _parquet_examples(path: Path, options: SourceOptions) -> Iterator[Example]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise KLFlowError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and others for a damaged file
        raise KLFlowError(f"{path} is not a readable Parquet file: {err}") from None
    columns = sorted({top_column(name, table.schema_arrow.names, str(path)) for name in options.fields()})
    row = 0
    for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
        for record in batch.to_pylist():
            row += 1
            example = record_example(record, options, f"{path} row {row}")
            if example is not None:
                yield example


def top_column(field_name: str, columns: list[str], where: str) -> str:
    """The column holding `field_name` (a column name, or a dotted path whose first part is one)."""
    if field_name in columns:
        return field_name
    top = field_name.split(".", 1)[0]
    if top not in columns:
        raise KLFlowError(f"{where} has no column {field_name!r} (columns: {', '.join(columns)})")
    return top


def _field(record: Any, name: str, where: str) -> str:
    value = record.get(name) if isinstance(record, dict) else None
    if value is None and isinstance(record, dict) and "." in name:
        value = record
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if not isinstance(value, str):
        raise KLFlowError(f'{where} has no string "{name}" field')
    return value


def slug(name: str) -> str:
    """`name` reduced to a safe folder-name part."""
    return _SLUG.sub("_", name).strip("_") or "data"
