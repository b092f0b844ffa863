"""The in-domain judge: a klflow checkpoint trained with `--method ar` on the samples' corpus.

Texts are re-tokenized with the checkpoint's own tokenizer (its run's data tokenizer); a written
<|endoftext|> becomes the end-of-text token, where the text is then cut, as for every judge
(`klflow sample` and the data row both write a generated end-of-text as a newline, so neither is
cut). The end-of-text token is also the context before each text: it is how the AR baseline
starts every sample (its BOS), and what precedes each document in the training stream.

Context: the model is run on at most train.seq_len positions, the span its own sampler runs it
on. A longer row is scored in overlapping windows of that width, each advancing by half of it
(the last one ending at the row's end), every token scored once with at least half a window of
context, so texts are scored whole up to --max-length tokens, as under the other judges.

MAUVE features are the final hidden state (after the final RMSNorm, before the output layer) at
the text's last token, as for the Hugging Face judges.

The judge is in-domain: text from its own training split scores lower than held-out text of the
same corpus, so compare samples with the data row, never with training text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from klflow.checkpoint import LATEST, load_checkpoint
from klflow.data import TextTokenizer
from klflow.errors import KLFlowError
from klflow.evaluation.evaluator import END_OF_TEXT, Evaluator
from klflow.model import Denoiser


@dataclass(frozen=True)
class ARJudge(Evaluator):
    """A causal klflow Denoiser, its tokenizer and the sequence length it was trained at."""

    tokenizer: TextTokenizer
    model: Denoiser
    seq_len: int

    @property
    def device(self) -> torch.device:
        return self.model.embed.device

    @property
    def hidden_size(self) -> int:
        return self.model.d_model

    @property
    def max_positions(self) -> int:
        return self.seq_len

    @property
    def eos_token(self) -> str:
        return END_OF_TEXT

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        # The tokenizer keeps a written <|endoftext|> as plain text (a document cannot forge one);
        # here it is the end-of-text, as Hugging Face tokenizers read it for the other judges.
        pieces = [text.split(END_OF_TEXT) for text in texts]
        encoded = iter(self.tokenizer.encode_batch([piece for split in pieces for piece in split]))
        ids = []
        for split in pieces:
            row: list[int] = []
            for i in range(len(split)):
                row += ([self.eos_id] if i else []) + next(encoded)
            ids.append(row)
        return ids

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # No mask needed: under causal attention no real position sees the right padding after it.
        hidden = self.model.final_hidden(input_ids)
        return self.model.lm_head(hidden), hidden


def is_klflow_checkpoint(directory: Path) -> bool:
    """A klflow run (a `latest` file) or checkpoint (state.json beside the weights); Hugging Face folders have neither."""
    if (directory / LATEST).is_file():
        return True
    return (directory / "state.json").is_file() and (directory / "model.safetensors").is_file()


def load_ar_judge(name: str, device: torch.device) -> ARJudge:
    """The AR checkpoint at `name` (a run directory or one of its checkpoints) as a judge; other methods are refused."""
    checkpoint = load_checkpoint(Path(name).expanduser(), device)
    method = checkpoint.config.get("experiment", {}).get("method", {}).get("name")
    if method != "ar" or not checkpoint.model.causal:
        raise KLFlowError(f"{name} was trained with --method {method}; only an autoregressive checkpoint "
                          "(--method ar) can be an evaluator")
    experiment = checkpoint.experiment()
    seq_len = experiment.train.seq_len
    description = (f"klflow AR checkpoint {checkpoint.dir} (step {checkpoint.state.get('step')}, "
                   f"{checkpoint.model.num_parameters():,} parameters, trained on {experiment.data.source} "
                   f"at seq_len {seq_len}, vocabulary {checkpoint.tokenizer.vocab_size})")
    # A Denoiser's parameters are float32 (load_state_dict casts into them): the judge runs in float32.
    checkpoint.model.requires_grad_(False)
    return ARJudge(name, description, checkpoint.tokenizer.eot_id, checkpoint.tokenizer, checkpoint.model, seq_len)
