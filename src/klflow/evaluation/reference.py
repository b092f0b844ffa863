"""Real text to compare samples with: the "data row" and the MAUVE reference.

The data row is held-out text put through exactly what the samples go through: n windows of
`seq_len` tokens of the validation split (non-overlapping, spread evenly over it), decoded with
the data's tokenizer as `klflow sample` decodes its output (an end-of-text becomes a newline).
Its scores are what real text of that length gets under the same evaluator: the point a
generator should approach, from above in gen-PPL and from either side in entropy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from klflow.data import PreparedData, TextTokenizer, check_compatible, prepare, validation_windows
from klflow.data.shards import is_prepared_folder
from klflow.errors import KLFlowError
from klflow.evaluation.samples import SampleSet


def validation_texts(data: PreparedData, n: int, seq_len: int) -> list[str]:
    """Up to n decoded validation windows of seq_len tokens (fewer when the split is shorter)."""
    windows = validation_windows(data.val_tokens(), seq_len, n)
    tokenizer = data.tokenizer()
    return [tokenizer.decode(row) for row in windows.tolist()]


def data_for_samples(samples: SampleSet, data: str | None = None) -> PreparedData:
    """The prepared data behind the samples: `data` (a prepared folder or a corpus source), else
    the "data_dir" recorded in the config.json of the checkpoint that generated them."""
    checkpoint = _single_checkpoint(samples)
    config = _read_config(checkpoint) if checkpoint else {}
    tokenizer_file = checkpoint / "tokenizer.json" if checkpoint and (checkpoint / "tokenizer.json").is_file() else None
    if data is not None:
        prepared = open_or_prepare(data, config.get("experiment", {}).get("data", {}), tokenizer_file)
    else:
        if checkpoint is None:
            raise KLFlowError(f"{samples.path} names no checkpoint, so its training data is unknown; pass --data DIR-or-source")
        if "data_dir" not in config:
            raise KLFlowError(f"{checkpoint}/config.json is missing or records no data_dir; pass --data DIR-or-source")
        prepared = PreparedData.load(config["data_dir"])
    if tokenizer_file is not None:
        # Windows of seq_len tokens are the samples' length only under the samples' own tokenizer.
        check_compatible(prepared, TextTokenizer.from_file(tokenizer_file))
    return prepared


def _single_checkpoint(samples: SampleSet) -> Path | None:
    checkpoints = samples.checkpoints()
    if len(checkpoints) > 1:
        raise KLFlowError(f"{samples.path} mixes samples of {len(checkpoints)} checkpoints; evaluate them separately")
    return Path(checkpoints[0]) if checkpoints else None


def _read_config(checkpoint: Path) -> dict[str, Any]:
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except OSError:
        return {}  # moved or deleted since sampling; only --data can say what it was trained on
    except ValueError:
        raise KLFlowError(f"{checkpoint}/config.json is not valid JSON") from None
    return config if isinstance(config, dict) else {}


def open_or_prepare(data: str, recorded: dict[str, Any], tokenizer_file: Path | None) -> PreparedData:
    """A prepared data folder, or a corpus source prepared with the recorded data settings and tokenizer."""
    if is_prepared_folder(data):
        return PreparedData.load(Path(data).expanduser())
    # A corpus source is prepared (or found in the cache) as the checkpoint's run prepared it,
    # with the checkpoint's own tokenizer when it has one.
    return prepare(data, vocab_size=recorded.get("vocab_size", 4096), val_fraction=recorded.get("val_fraction", 0.05),
                   seed=recorded.get("seed", 0), tokenizer=str(tokenizer_file) if tokenizer_file else "bpe")
