"""Tokenize a corpus once into cached train/val token shards (`klflow prepare`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from klflow.data.corpus import CHITCHAT, chitchat_version, corpus_files, load_corpus
from klflow.data.tokenizer import TextTokenizer, check_vocab_size
from klflow.errors import KLFlowError

FORMAT_VERSION = 1
_ENCODE_CHUNK = 512  # documents per encode_batch call: parallel enough, bounded memory


def klflow_home() -> Path:
    """Root of klflow's caches: `$KLFLOW_HOME`, else `~/.cache/klflow`."""
    home = os.environ.get("KLFLOW_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "klflow"


def default_data_dir(source: str, vocab_size: int) -> Path:
    """Where `prepare` puts `source` tokenized with a `vocab_size` BPE unless told otherwise."""
    if source == CHITCHAT:
        slug = CHITCHAT
    else:
        path = Path(source).expanduser().resolve()
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", path.name).strip("_") or "data"
        # The hash keeps same-named folders in different places apart.
        slug = f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    return klflow_home() / "data" / f"{slug}-bpe{vocab_size}"


class PreparedData:
    """A folder written by `prepare`: meta.json, tokenizer.json, train.bin, val.bin."""

    def __init__(self, dir: Path, meta: dict) -> None:
        self.dir = dir
        self.meta = meta

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
            itemsize = np.dtype(meta["dtype"]).itemsize
            sizes = {
                "train.bin": meta["n_train_tokens"] * itemsize,
                "val.bin": meta["n_val_tokens"] * itemsize,
            }
        except (ValueError, KeyError, TypeError):
            raise KLFlowError(f"{meta_path} is malformed ({hint} again)") from None
        for name, size in sizes.items():
            shard = dir / name
            if not shard.is_file() or shard.stat().st_size != size:
                raise KLFlowError(f"{shard} is missing or truncated ({hint} again)")
        return cls(dir, meta)

    def tokenizer(self) -> TextTokenizer:
        return TextTokenizer.from_file(self.dir / "tokenizer.json")

    def train_tokens(self) -> np.ndarray:
        return self._shard("train.bin")

    def val_tokens(self) -> np.ndarray:
        return self._shard("val.bin")

    def _shard(self, name: str) -> np.ndarray:
        return np.memmap(self.dir / name, dtype=self.meta["dtype"], mode="r")


def prepare(
    source: str,
    out_dir: Path | None = None,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> PreparedData:
    """Split `source` into train/val documents, train a BPE on train, and write token shards.

    Reuses `out_dir` when it was prepared from the same source with the same parameters.
    """
    if not 0 < val_fraction < 1:
        raise KLFlowError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    check_vocab_size(vocab_size)
    out_dir = Path(out_dir) if out_dir is not None else default_data_dir(source, vocab_size)
    params = {
        "format_version": FORMAT_VERSION,
        "source_identity": _source_identity(source),
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    cached = _reusable(out_dir, params)
    if cached is not None:
        return cached
    _check_replaceable(out_dir)

    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftover of a killed run that had our pid
        tmp_dir.mkdir(parents=True)
        meta = _write_shards(source, tmp_dir, params, progress)
        _swap_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return PreparedData(out_dir, meta)


def _source_identity(source: str) -> dict:
    """What the shards were built from; when it changes the cache is stale."""
    if source == CHITCHAT:
        return {"corpus": CHITCHAT, "version": chitchat_version()}
    path = Path(source).expanduser()
    stats = [file.stat() for file in corpus_files(path)]
    return {
        "path": str(path.resolve()),
        "n_files": len(stats),
        "n_bytes": sum(s.st_size for s in stats),
        "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
    }


def _reusable(out_dir: Path, params: dict) -> PreparedData | None:
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or any(meta.get(key) != value for key, value in params.items()):
        return None
    try:
        return PreparedData.load(out_dir)
    except KLFlowError:
        return None


def _check_replaceable(out_dir: Path) -> None:
    # prepare replaces out_dir wholesale, so never let it eat a folder that is not klflow's own.
    if out_dir.exists() and not out_dir.is_dir():
        raise KLFlowError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "meta.json").is_file():
        raise KLFlowError(f"refusing to overwrite {out_dir}: it is not a klflow data folder")


def _write_shards(source: str, dir: Path, params: dict, progress: bool) -> dict:
    corpus = load_corpus(source)
    documents = corpus.documents
    if len(documents) < 2:
        raise KLFlowError(f"corpus {corpus.name} has only one document; a train/val split needs 2")
    if corpus.replaced_chars:
        print(
            f"warning: {corpus.replaced_chars} undecodable bytes in {corpus.name} were replaced by U+FFFD",
            file=sys.stderr,
        )

    order = np.random.default_rng(params["seed"]).permutation(len(documents))
    n_val = min(len(documents) - 1, max(1, round(params["val_fraction"] * len(documents))))
    # Sorting keeps each split in corpus order; the shuffle only decides membership.
    val_docs = [documents[i] for i in sorted(order[:n_val])]
    train_docs = [documents[i] for i in sorted(order[n_val:])]

    tokenizer = TextTokenizer.train(train_docs, params["vocab_size"])
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
    bar = tqdm(total=len(documents), unit="doc", desc="tokenizing", disable=not progress, file=sys.stderr)
    with bar:
        n_train_tokens = _write_tokens(dir / "train.bin", train_docs, tokenizer, dtype, bar)
        n_val_tokens = _write_tokens(dir / "val.bin", val_docs, tokenizer, dtype, bar)
    tokenizer.save(dir / "tokenizer.json")

    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    n_content_tokens = n_train_tokens + n_val_tokens - len(documents)  # end-of-text markers carry no bytes
    meta = {
        "format_version": FORMAT_VERSION,
        "source": str(source),
        "source_identity": params["source_identity"],
        "vocab_size": tokenizer.vocab_size,
        "val_fraction": params["val_fraction"],
        "seed": params["seed"],
        "dtype": np.dtype(dtype).name,
        "n_documents": len(documents),
        "n_train_documents": len(train_docs),
        "n_val_documents": len(val_docs),
        "n_train_tokens": n_train_tokens,
        "n_val_tokens": n_val_tokens,
        "n_bytes": n_bytes,
        "bytes_per_token": round(n_bytes / n_content_tokens, 4),
        "replaced_chars": corpus.replaced_chars,
        "tokenizer_fingerprint": tokenizer.fingerprint,
    }
    (dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _write_tokens(path: Path, documents: list[str], tokenizer: TextTokenizer, dtype: type, bar: tqdm) -> int:
    """Append each document's tokens plus an end-of-text to `path`; returns the token count."""
    n_tokens = 0
    with open(path, "wb") as f:
        for start in range(0, len(documents), _ENCODE_CHUNK):
            chunk = documents[start : start + _ENCODE_CHUNK]
            flat: list[int] = []
            for ids in tokenizer.encode_batch(chunk):
                flat.extend(ids)
                flat.append(tokenizer.eot_id)
            np.asarray(flat, dtype=dtype).tofile(f)
            n_tokens += len(flat)
            bar.update(len(chunk))
    return n_tokens


def _swap_into_place(tmp_dir: Path, out_dir: Path) -> None:
    # The old folder is moved aside only now that the new one is complete,
    # so out_dir is never half-written, even after a crash.
    old_dir = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        shutil.rmtree(old_dir, ignore_errors=True)
        out_dir.rename(old_dir)
    tmp_dir.rename(out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
