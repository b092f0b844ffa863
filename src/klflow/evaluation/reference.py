"""Real text to compare samples with: the "data row" and the MAUVE reference.

The data row is held-out text put through exactly what the samples go through: n windows of
`seq_len` tokens of the validation split (non-overlapping, spread evenly over it), decoded with
the data's tokenizer as `klflow sample` decodes its output (an end-of-text becomes a newline).
Its scores are the ceiling a generator of that length can aim for under the same evaluator.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from klflow.data import PreparedData, TextTokenizer, prepare, validation_windows
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
    if data is not None:
        prepared = _open_or_prepare(data, config.get("experiment", {}).get("data", {}))
    else:
        if checkpoint is None:
            raise KLFlowError(f"{samples.path} names no checkpoint, so its training data is unknown; pass --data DIR-or-source")
        if "data_dir" not in config:
            raise KLFlowError(f"{checkpoint}/config.json records no data_dir; pass --data DIR-or-source")
        prepared = PreparedData.load(config["data_dir"])
    _warn_on_tokenizer_mismatch(checkpoint, prepared)
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


def _open_or_prepare(data: str, recorded: dict[str, Any]) -> PreparedData:
    if (Path(data).expanduser() / "meta.json").is_file():
        return PreparedData.load(Path(data).expanduser())
    # A corpus source is prepared (or found in the cache) the way the checkpoint's run prepared it.
    return prepare(data, vocab_size=recorded.get("vocab_size", 4096), val_fraction=recorded.get("val_fraction", 0.05),
                   seed=recorded.get("seed", 0))


def _warn_on_tokenizer_mismatch(checkpoint: Path | None, data: PreparedData) -> None:
    # Token lengths mean different amounts of text under different tokenizers.
    if checkpoint is None or not (checkpoint / "tokenizer.json").is_file():
        return
    if TextTokenizer.from_file(checkpoint / "tokenizer.json").fingerprint != data.meta.get("tokenizer_fingerprint"):
        print(f"warning: {data.dir} was tokenized differently from the samples' checkpoint {checkpoint}; "
              "the data row's windows do not match the samples' length in text", file=sys.stderr)
