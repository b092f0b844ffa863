"""Tokenize a corpus once into cached train/val token shards with document boundaries (`klflow prepare`).

A prepared folder holds meta.json, tokenizer.json and, for each split S of train and val:
  S.bin         every example's tokens followed by an end-of-text, back to back (uint16, or uint32 when V >= 65536);
  S.idx.npy     int64 offsets: example i is S.bin[idx[i]:idx[i+1]], end-of-text included;
  S.prompt.npy  int32 prompt length of each example (prompt plus separator; 0 for a plain document).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from klflow.data.corpus import Example, Source, SourceOptions
from klflow.data.fetch import gpt2_files, klflow_home
from klflow.data.sources import open_source, source_slug
from klflow.data.tokenizer import TOKENIZER_KINDS, TextTokenizer, check_vocab_size, tokenizer_file
from klflow.errors import KLFlowError
from klflow.outputs import check_output_folder
from klflow.progress import ProgressLines, progress_bar

FORMAT_VERSION = 2
SPLITS = ("train", "val")
_CHUNK_CHARS = 1 << 20  # text per encode_batch call: parallel enough; its encodings take ~60x its size
_CHUNK_EXAMPLES = 4096
# Tokenizers are trained on at most this much text; past it the merges barely change, the time keeps growing.
TOKENIZER_TRAIN_CHARS = 1 << 30


def default_data_dir(source: str, vocab_size: int, tokenizer: str = "bpe", options: SourceOptions | None = None) -> Path:
    """Where `prepare` puts `source` tokenized as asked unless told otherwise."""
    file = tokenizer_file(tokenizer)
    if file is not None:
        suffix = f"tok{TextTokenizer.from_file(file).fingerprint[:8]}"
    else:
        suffix = {"bpe": f"bpe{vocab_size}", "gpt2": "gpt2", "char": "char"}[tokenizer]
    return klflow_home() / "data" / f"{source_slug(source, options)}-{suffix}"


class PreparedData:
    """A folder written by `prepare` (see the module docstring)."""

    def __init__(self, dir: Path, meta: dict) -> None:
        self.dir = dir
        self.meta = meta
        self.reused = False  # set by prepare when it found the folder already built

    @classmethod
    def load(cls, dir: str | Path) -> PreparedData:
        """Open a prepared folder, checking that it is complete."""
        dir = Path(dir)
        hint = "run `klflow prepare` first"
        meta_path = dir / "meta.json"
        if not meta_path.is_file():
            raise KLFlowError(f"no prepared data at {dir} ({hint})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            version = meta.get("format_version")
            itemsize = np.dtype(meta["dtype"]).itemsize
            counts = {split: (meta[f"n_{split}_tokens"], meta[f"n_{split}_documents"]) for split in SPLITS}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise KLFlowError(f"{meta_path} is malformed ({hint} again)") from None
        if version != FORMAT_VERSION:
            raise KLFlowError(f"{dir} is in data format {version}; this klflow reads format {FORMAT_VERSION} "
                              f"({hint} again)")
        for split, (n_tokens, n_documents) in counts.items():
            shard = dir / f"{split}.bin"
            if not shard.is_file() or shard.stat().st_size != n_tokens * itemsize:
                raise KLFlowError(f"{shard} is missing or truncated ({hint} again)")
            try:
                offsets = np.load(dir / f"{split}.idx.npy", mmap_mode="r")
                prompts = np.load(dir / f"{split}.prompt.npy", mmap_mode="r")
                intact = offsets.shape == (n_documents + 1,) and offsets[-1] == n_tokens and prompts.shape == (n_documents,)
            except (OSError, ValueError):
                intact = False
            if not intact:
                raise KLFlowError(f"the document index of {split} in {dir} is missing or damaged ({hint} again)")
        return cls(dir, meta)

    def tokenizer(self) -> TextTokenizer:
        return TextTokenizer.from_file(self.dir / "tokenizer.json")

    def tokens(self, split: str) -> np.ndarray:
        """All tokens of `split` ("train" or "val"), memory-mapped read-only."""
        return np.memmap(self.dir / f"{_split(split)}.bin", dtype=self.meta["dtype"], mode="r")

    def offsets(self, split: str) -> np.ndarray:
        """int64 [n+1]: example i of `split` is tokens(split)[offsets[i]:offsets[i+1]] (end-of-text included)."""
        return np.load(self.dir / f"{_split(split)}.idx.npy", mmap_mode="r")

    def prompt_lengths(self, split: str) -> np.ndarray:
        """int32 [n]: how many leading tokens of each example are its prompt (0 for a plain document)."""
        return np.load(self.dir / f"{_split(split)}.prompt.npy", mmap_mode="r")

    def train_tokens(self) -> np.ndarray:
        return self.tokens("train")

    def val_tokens(self) -> np.ndarray:
        return self.tokens("val")


def is_prepared_folder(path: str | Path) -> bool:
    """Whether `path` is a folder that `prepare` wrote (a meta.json in it), not a corpus to prepare."""
    return (Path(path).expanduser() / "meta.json").is_file()


def check_compatible(data: PreparedData, tokenizer: TextTokenizer) -> None:
    """Raise unless `data` was tokenized with exactly `tokenizer` (e.g. a checkpoint's)."""
    if data.meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise KLFlowError(
            f"{data.dir} was tokenized with another tokenizer ({data.meta.get('tokenizer')}, "
            f"V={data.meta.get('vocab_size')}) than this one (V={tokenizer.vocab_size}); prepare the data "
            "with this tokenizer: klflow prepare SOURCE --tokenizer CHECKPOINT_DIR"
        )


def prepare(
    source: str,
    out_dir: Path | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    *,
    tokenizer: str = "bpe",
    options: SourceOptions | None = None,
    streaming: bool = False,
    force: bool = False,
) -> PreparedData:
    """Split `source` into train/val examples, build the tokenizer on train, and write token shards.

    `tokenizer` is bpe (trained, exactly `vocab_size` tokens), char (trained, at most `vocab_size`),
    gpt2 (fixed, V=50259) or a tokenizer.json / folder holding one (e.g. a checkpoint's). With
    `streaming` the examples are never all in memory: the split is decided per example by a hash
    (so its sizes are only close to `val_fraction`) and the source is read twice when a tokenizer is
    trained. Reuses `out_dir` when it was prepared from the same source with the same parameters
    (the same bytes, by their sha256), unless `force`.
    """
    if not 0 < val_fraction < 1:
        raise KLFlowError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    file = tokenizer_file(tokenizer)
    if tokenizer in ("bpe", "char"):
        check_vocab_size(vocab_size)
    options = options or SourceOptions()
    where = "--out" if out_dir is not None else "the data cache ($KLFLOW_HOME)"
    out_dir = Path(out_dir) if out_dir is not None else default_data_dir(source, vocab_size, tokenizer, options)
    if not (out_dir / "meta.json").is_file():  # a folder that may be reused need not be writable
        check_output_folder(out_dir, where)
    opened = open_source(source, options, streaming)
    params = {
        "format_version": FORMAT_VERSION,
        "source_identity": opened.identity,
        "tokenizer": {"file": TextTokenizer.from_file(file).fingerprint} if file else tokenizer,
        "vocab_size": vocab_size if tokenizer in ("bpe", "char") else None,
        "val_fraction": val_fraction,
        "seed": seed,
        "streaming": streaming,
    }
    cached = None if force else _reusable(out_dir, params)
    if cached is not None:
        return cached
    _check_replaceable(out_dir)

    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftover of a killed run that had our pid
        tmp_dir.mkdir(parents=True)
        meta = _write_shards(opened, tmp_dir, params, tokenizer, progress)
        _swap_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return PreparedData(out_dir, meta)


def write_derived(out_dir: Path, like: PreparedData, train_documents: Iterable[Sequence[int]],
                  derivation: dict, progress: Callable[[int], None] | None = None) -> PreparedData:
    """A prepared folder at `out_dir` whose train split is `train_documents` and whose tokenizer and
    validation split are `like`'s, byte for byte: e.g. a teacher's samples as a student's training data,
    validated on the real text. Each document must end with like's end-of-text and hold no other.

    meta.json is like's with the train counts replaced, "source" set to derivation["source"] and the whole
    `derivation` recorded under "derived_from". The folder appears only once complete (as in `prepare`).
    progress: called with each document's token count as it is written.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, "--out")
    _check_replaceable(out_dir)
    eot = like.meta["special_ids"]["eot"]
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        writer = _SplitWriter(tmp_dir, "train", np.dtype(like.meta["dtype"]).type)
        try:
            for document in train_documents:
                document = list(document)
                if not document or document[-1] != eot or eot in document[:-1]:
                    raise KLFlowError("a derived document must end with the end-of-text token and hold no other")
                writer.add([document], np.zeros(1, dtype=np.int32))
                if progress is not None:
                    progress(len(document))
        finally:
            writer.close()
        n_documents, n_tokens = writer.finish()
        if n_documents == 0:
            raise KLFlowError("a derived data folder needs at least one training document")
        for name in ("tokenizer.json", "val.bin", "val.idx.npy", "val.prompt.npy"):
            shutil.copyfile(like.dir / name, tmp_dir / name)
        meta = {**like.meta, "source": derivation["source"], "source_identity": derivation["source"],
                "params": {"format_version": FORMAT_VERSION, "derived_from": derivation},
                "pairs": False, "n_documents": n_documents + like.meta["n_val_documents"],
                "n_train_documents": n_documents, "n_train_tokens": n_tokens, "derived_from": derivation}
        (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return PreparedData.load(out_dir)


def _split(split: str) -> str:
    if split not in SPLITS:
        raise KLFlowError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def _reusable(out_dir: Path, params: dict) -> PreparedData | None:
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("params") != params:
        return None
    try:
        data = PreparedData.load(out_dir)
    except KLFlowError:
        return None
    data.reused = True
    return data


def _check_replaceable(out_dir: Path) -> None:
    # prepare replaces out_dir wholesale, so never let it eat a folder that is not klflow's own.
    if out_dir.exists() and not out_dir.is_dir():
        raise KLFlowError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "meta.json").is_file():
        raise KLFlowError(f"refusing to overwrite {out_dir}: it is not a klflow data folder")


def _write_shards(source: Source, dir: Path, params: dict, tokenizer_spec: str, progress: bool) -> dict:
    started = time.perf_counter()
    examples, is_val, total_bytes = _plan(source, params)
    train_texts = (_joined(e, source.separator) for chunk, val in _chunks(examples(), is_val)
                   for e, v in zip(chunk, val) if not v)
    tokenizer = _build_tokenizer(tokenizer_spec, _capped(train_texts, TOKENIZER_TRAIN_CHARS), params["vocab_size"])
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
    encoding_started = time.perf_counter()
    counts, n_bytes = _write_tokens(examples(), is_val, tokenizer, source.separator, dir, dtype,
                                    progress_bar(total_bytes, "tokenizing", "B", not progress, unit_scale=True))
    source.warn()
    n_documents = sum(n_docs for n_docs, _ in counts.values())
    for split, (n_docs, _) in counts.items():
        if n_docs == 0:
            raise KLFlowError(f"the {split} split of {source.name} drew no documents (of {n_documents}); "
                              "raise --val-fraction (the data.val_fraction key) or prepare without --streaming")
    tokenizer.save(dir / "tokenizer.json")

    n_content_tokens = sum(n_tok for _, n_tok in counts.values()) - n_documents  # end-of-text carries no bytes
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source.name,
        "source_identity": source.identity,
        "params": params,
        "tokenizer": tokenizer_spec if tokenizer_spec in TOKENIZER_KINDS else "file",
        "vocab_size": tokenizer.vocab_size,
        "special_ids": {"eot": tokenizer.eot_id, "pad": tokenizer.pad_id, "mask": tokenizer.mask_id},
        "val_fraction": params["val_fraction"],
        "seed": params["seed"],
        "split": "hash" if params["streaming"] else "exact",
        "dtype": np.dtype(dtype).name,
        "pairs": source.pairs,
        "pair_separator": source.separator,
        "n_documents": n_documents,
        "n_train_documents": counts["train"][0],
        "n_val_documents": counts["val"][0],
        "n_train_tokens": counts["train"][1],
        "n_val_tokens": counts["val"][1],
        "n_bytes": n_bytes,
        "bytes_per_token": round(n_bytes / max(1, n_content_tokens), 4),
        "replaced_chars": source.stats.replaced_chars,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "seconds": {"total": round(time.perf_counter() - started, 2),
                    "encoding": round(time.perf_counter() - encoding_started, 2)},
    }
    (dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _plan(source: Source, params: dict
          ) -> tuple[Callable[[], Iterator[Example]], Callable[[np.ndarray], np.ndarray], int | None]:
    """How to pass over the examples, which are validation, and their total size when known."""
    if params["streaming"]:
        if next(source.examples(), None) is None:
            raise KLFlowError(f"corpus {source.name} is empty")
        return source.examples, _hash_split(params["seed"], params["val_fraction"]), None
    in_memory = list(source.examples())
    if not in_memory:
        raise KLFlowError(f"corpus {source.name} is empty")
    if len(in_memory) == 1:
        raise KLFlowError(f"corpus {source.name} has only one document; a train/val split needs 2: in a text file, "
                          "a blank line separates documents (one document per paragraph)")
    total_bytes = sum(_n_bytes(e, source.separator) for e in in_memory)
    return (functools.partial(iter, in_memory), _exact_split(len(in_memory), params["seed"], params["val_fraction"]),
            total_bytes)


def _write_tokens(examples: Iterator[Example], is_val: Callable[[np.ndarray], np.ndarray], tokenizer: TextTokenizer,
                  separator: str, dir: Path, dtype: type, bar: tqdm | ProgressLines) -> tuple[dict[str, tuple[int, int]], int]:
    """Encode the examples chunk by chunk into the split files; returns (documents, tokens) per split and
    the bytes of text encoded."""
    writers = {split: _SplitWriter(dir, split, dtype) for split in SPLITS}
    n_bytes = 0
    try:
        for chunk, val in _chunks(examples, is_val):
            ids, prompt_lengths = _encode(chunk, tokenizer, separator)
            for split, selected in (("train", ~val), ("val", val)):
                writers[split].add([ids[i] for i in np.flatnonzero(selected)], prompt_lengths[selected])
            chunk_bytes = sum(_n_bytes(e, separator) for e in chunk)
            n_bytes += chunk_bytes
            bar.update(chunk_bytes)
    finally:
        bar.close()
        for writer in writers.values():
            writer.close()
    return {split: writer.finish() for split, writer in writers.items()}, n_bytes


def _build_tokenizer(spec: str, train_texts: Iterable[str], vocab_size: int | None) -> TextTokenizer:
    """The tokenizer `spec` names; only bpe and char read `train_texts`."""
    file = tokenizer_file(spec)
    if file is not None:
        return TextTokenizer.from_file(file)
    if spec == "gpt2":
        return TextTokenizer.gpt2(gpt2_files())
    assert vocab_size is not None  # prepare sets it for the trained kinds
    if spec == "char":
        return TextTokenizer.train_chars(train_texts, vocab_size)
    return TextTokenizer.train(train_texts, vocab_size)


def _exact_split(n: int, seed: int, val_fraction: float) -> Callable[[np.ndarray], np.ndarray]:
    """Exactly round(val_fraction * n) validation examples (at least 1, leaving at least 1 for train)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    val = np.zeros(n, dtype=bool)
    val[order[:n_val]] = True
    return lambda index: val[index]


def _hash_split(seed: int, val_fraction: float) -> Callable[[np.ndarray], np.ndarray]:
    """Each example is validation with probability val_fraction, decided by a hash of (seed, index)
    alone, so the split needs no count of the corpus and never changes with chunking."""
    def is_val(index: np.ndarray) -> np.ndarray:
        # splitmix64: wrapping uint64 arithmetic is the point, hence the silenced overflow warnings.
        with np.errstate(over="ignore"):
            x = index.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
        return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_fraction

    return is_val


def _chunks(examples: Iterator[Example], is_val: Callable[[np.ndarray], np.ndarray]
            ) -> Iterator[tuple[list[Example], np.ndarray]]:
    """Consecutive chunks of examples (bounded in characters and count), each with its validation flags."""
    start = 0
    while True:
        chunk: list[Example] = []
        size = 0
        for example in itertools.islice(examples, _CHUNK_EXAMPLES):
            chunk.append(example)
            size += len(example.text) + len(example.prompt or "")
            if size >= _CHUNK_CHARS:
                break
        if not chunk:
            return
        yield chunk, is_val(np.arange(start, start + len(chunk)))
        start += len(chunk)


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= max_chars:
            return


def _joined(example: Example, separator: str) -> str:
    return example.text if example.prompt is None else example.prompt + separator + example.text


def _n_bytes(example: Example, separator: str) -> int:
    return len(_joined(example, separator).encode("utf-8"))


def _encode(chunk: list[Example], tokenizer: TextTokenizer, separator: str) -> tuple[list[list[int]], np.ndarray]:
    """Each example's ids (prompt + separator, then text, then end-of-text) and its prompt length."""
    prompts = [e.prompt + separator for e in chunk if e.prompt is not None]
    encoded = tokenizer.encode_batch(prompts + [e.text for e in chunk])
    prompt_ids, text_ids = iter(encoded[: len(prompts)]), encoded[len(prompts):]
    ids, prompt_lengths = [], np.zeros(len(chunk), dtype=np.int32)
    for i, (example, text) in enumerate(zip(chunk, text_ids)):
        head = next(prompt_ids) if example.prompt is not None else []
        prompt_lengths[i] = len(head)
        ids.append(head + text + [tokenizer.eot_id])
    return ids, prompt_lengths


class _SplitWriter:
    """Appends examples to S.bin and collects their offsets and prompt lengths (8 + 4 bytes each)."""

    def __init__(self, dir: Path, split: str, dtype: type) -> None:
        self._dir, self._split, self._dtype = dir, split, dtype
        self._file = open(dir / f"{split}.bin", "wb")
        self._lengths: list[np.ndarray] = []
        self._prompts: list[np.ndarray] = []

    def add(self, ids: list[list[int]], prompt_lengths: np.ndarray) -> None:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat: np.ndarray = np.fromiter(itertools.chain.from_iterable(ids), dtype=self._dtype, count=int(lengths.sum()))
        flat.tofile(self._file)
        self._lengths.append(lengths)
        self._prompts.append(prompt_lengths)

    def close(self) -> None:
        self._file.close()

    def finish(self) -> tuple[int, int]:
        """Write the index of the closed shard; returns (documents, tokens)."""
        lengths = np.concatenate([np.zeros(1, np.int64), *self._lengths])
        offsets = np.cumsum(lengths)
        np.save(self._dir / f"{self._split}.idx.npy", offsets)
        np.save(self._dir / f"{self._split}.prompt.npy", np.concatenate([np.zeros(0, np.int32), *self._prompts]))
        return len(offsets) - 1, int(offsets[-1])


def _swap_into_place(tmp_dir: Path, out_dir: Path) -> None:
    # The old folder is moved aside only now that the new one is complete,
    # so out_dir is never half-written, even after a crash.
    old_dir = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        shutil.rmtree(old_dir, ignore_errors=True)
        out_dir.rename(old_dir)
    tmp_dir.rename(out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
