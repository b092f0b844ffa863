"""Hugging Face `datasets` sources (`--hf NAME`): the local cache, or the hub when it is reachable.

`datasets` is optional. When the hub cannot be reached the loader goes offline at once, so a dataset
that is neither cached nor reachable is a one-line KLFlowError within seconds, not minutes of retries.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from klflow.data.corpus import Example, ReadStats, Source, SourceOptions, record_example, top_column
from klflow.errors import KLFlowError

HF_PREFIX = "hf:"
PROBE_TIMEOUT_S = 5.0
_BATCH_ROWS = 1000
_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hf_source(name: str, options: SourceOptions, streaming: bool) -> Source:
    """The split `options.hf_split` of dataset `name` (a hub id or a local folder of data files)."""
    dataset = _load(name, options, streaming)  # now, so a missing dataset fails before anything is written
    columns = dataset.column_names
    if columns is not None:  # a streamed dataset may not know its columns before reading
        needed = {top_column(field_name, columns, f"Hugging Face dataset {name}") for field_name in options.fields()}
        # Only the needed columns are decoded from the Arrow table.
        dataset = dataset.select_columns(sorted(needed))
    identity = {"hf": name, "config": options.hf_config, "split": options.hf_split, "fields": options.fields(),
                "streaming": streaming,
                # datasets' own hash of the cached table: changes when the cached data does.
                "fingerprint": getattr(dataset, "_fingerprint", None)}

    def read(stats: ReadStats) -> Iterator[Example]:
        row = 0
        for batch in dataset.iter(batch_size=_BATCH_ROWS):  # a streamed dataset restarts on each pass
            for values in zip(*batch.values()):
                row += 1
                example = record_example(dict(zip(batch.keys(), values)), options, f"{name} row {row}")
                if example is not None:
                    yield example

    return Source(f"{HF_PREFIX}{name}", identity, read, pairs=options.pairs)


def _load(name: str, options: SourceOptions, streaming: bool) -> Any:
    try:
        import datasets
    except ImportError:
        raise KLFlowError("--hf needs the Hugging Face datasets package: pip install datasets") from None
    local = Path(name).expanduser().exists()
    if not local and not _offline() and not _hub_reachable():
        _go_offline()
    try:
        return datasets.load_dataset(name, options.hf_config, split=options.hf_split, streaming=streaming)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if isinstance(err, ConnectionError) and _offline():
            raise KLFlowError(f"Hugging Face dataset {name} is not in the local cache and the hub cannot be "
                              f"reached (offline): {reason}") from None
        raise KLFlowError(f"could not load Hugging Face dataset {name}: {reason}") from None


def _offline() -> bool:
    return any(os.environ.get(flag, "").upper() in ("1", "ON", "YES", "TRUE") for flag in _OFFLINE_FLAGS)


def _hub_reachable() -> bool:
    """Whether a TCP connection to the hub opens within PROBE_TIMEOUT_S (name lookup included)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            result.append(True)
        except OSError:
            result.append(False)

    # A thread, because a name lookup has no timeout of its own.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return bool(result and result[0])


def _go_offline() -> None:
    for flag in _OFFLINE_FLAGS:
        os.environ[flag] = "1"
    import datasets.config
    import huggingface_hub.constants

    # Both read the flags when first imported; set them too in case that already happened.
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
