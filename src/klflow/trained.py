"""A trained model as one object: generate and fill holes with any method, save in the Hub's format.

    run = klflow.load("runs/x")                  # a run, a checkpoint, an exported folder or a Hub repo id
    run.generate(4, prompt="Hi there")           # 4 strings; return_ids=True adds the token ids
    run.infill("def f(x):\\n    <|hole-line:24|>\\n")

Sampler options are the method's generate() keywords, as `klflow sample` takes them (sampler,
t_star, select, readout, integrator, grid, switch_entropy, temperature, top_p, top_k, ...); a value of
None leaves the method's default. `klflow sample` and `klflow infill` go through the same calls.

The Hub's format (`save_pretrained` / `from_pretrained`, through huggingface_hub's ModelHubMixin)
is a checkpoint folder without the optimizer state: config.json (the experiment and the model's
architecture), model.safetensors, tokenizer.json, state.json (training counters, the validation
history and the weights' sha256) and a generated model card, README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from huggingface_hub import ModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

from klflow.checkpoint import LATEST, load_checkpoint, write_model_files
from klflow.data import PreparedData, TextTokenizer, validation_batches
from klflow.distributed import resolve_device
from klflow.errors import KLFlowError
from klflow.filling import CheckpointSampler, Filled, calls_made
from klflow.flow import SWITCH_CALIBRATIONS, SamplerOptions, calibrate_switch
from klflow.infill import Template, continuation
from klflow.infill import parse as parse_holes

HUB_FILES = ("config.json", "model.safetensors", "tokenizer.json", "state.json")

MODEL_CARD = """---
{{ card_data }}
---

# {{ title }}

A non-autoregressive text generator trained with klflow ({{ method_description }}).

| | |
|---|---|
| method | `{{ method }}` |
| data | `{{ data }}` ({{ tokenizer }} tokenizer, {{ vocab_size }} tokens) |
| model | {{ parameters }} parameters: {{ n_layer }} layers, d_model {{ d_model }}, window {{ seq_len }} tokens |
| training | {{ steps }} optimizer steps, {{ tokens }} tokens |
| validation loss | {{ val_loss }} |

```python
import klflow

run = klflow.load("{{ repo_id }}")  # this folder, or its repo id on the Hub
print(run.generate(4))
```

Paper: {{ paper_url }}
"""

METHOD_DESCRIPTIONS = {
    "klflow": "KL-geodesic flow matching",
    "ar": "the autoregressive baseline",
    "mdlm": "masked diffusion, MDLM",
    "dfm": "discrete flow matching with a mask source",
    "sedd": "score entropy discrete diffusion",
    "linear-simplex": "linear flow matching on the simplex",
    "fisher-rao": "Fisher-Rao flow matching on the simplex",
    "dirichlet": "Dirichlet flow matching",
}


def load(path_or_repo_id: str | Path, device: str | torch.device = "auto") -> TrainedModel:
    """A run directory (its latest checkpoint), a checkpoint, a folder in the Hub's format, or a Hub repo id.

    A path that exists is read as it is; anything else is a repo id for TrainedModel.from_pretrained
    (which reads only the Hub's cache when HF_HUB_OFFLINE=1).
    """
    if Path(path_or_repo_id).exists():
        return TrainedModel(path_or_repo_id, device)
    return TrainedModel.from_pretrained(str(path_or_repo_id), device=device)


def sampler_options(**given: Any) -> dict[str, Any]:
    """generate() keywords from the options given (None: the method's default; '-' in a key reads '_').

    A switch rule (t_star or switch_entropy) without a sampler asks for the sampler that switches: hybrid.
    """
    options = {key.replace("-", "_"): value for key, value in given.items() if value is not None}
    if "sampler" not in options and ("t_star" in options or "switch_entropy" in options):
        options["sampler"] = "hybrid"
    return options


class TrainedModel(
    ModelHubMixin,
    library_name="klflow",
    paper_url="https://arxiv.org/abs/2411.16821",
    pipeline_tag="text-generation",
    tags=["klflow", "non-autoregressive", "flow-matching"],
    model_card_template=MODEL_CARD,
):
    """A checkpoint's model, tokenizer and method, on one device."""

    def __init__(self, path: str | Path, device: str | torch.device = "auto") -> None:
        """path: a run directory (its latest checkpoint), a checkpoint or a folder in the Hub's format;
        device: 'auto' (a GPU if there is one), 'cpu', 'cuda', 'cuda:1', ..."""
        self.device = resolve_device(str(device))
        self.checkpoint = load_checkpoint(path, self.device)

    @property
    def model(self) -> torch.nn.Module:
        return self.checkpoint.model

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.checkpoint.tokenizer

    @property
    def method(self) -> str:
        return self.checkpoint.experiment().method.name

    def sampler(self, steps: int = 64, seed: int = 0, seq_len: int | None = None,
                log: Callable[[str], None] | None = None, **options: Any) -> CheckpointSampler:
        """The method with these sampler options (see sampler_options), ready to generate `steps` steps.

        switch_entropy 'data' or 'ode' is calibrated here (klflow.flow.switch), and how is passed to log.
        """
        if seq_len is not None and seq_len < 1:
            raise KLFlowError(f"seq_len must be >= 1 (klflow sample: --seq-len), got {seq_len}")
        options = sampler_options(**options)
        sampler = CheckpointSampler.load(self.checkpoint, options, self.device, seq_len)
        if options.get("switch_entropy") in SWITCH_CALIBRATIONS:
            calibrated, how = calibrate_switch(SamplerOptions(**options), sampler.forward, sampler.method.path,
                                               sampler.seq_len, steps, sampler.method.banned_ids, self.device, seed,
                                               lambda: self._validation_batches(sampler.seq_len),
                                               sampler.method.learned_warp)
            sampler.options = calibrated.keywords()
            sampler.info |= sampler.method.sample_settings(**sampler.options)
            if log is not None:
                log(f"switch_entropy={options['switch_entropy']}: {how}")
        sampler.info |= {"steps": steps, "seed": seed}
        return sampler

    def sample(self, num_samples: int = 1, steps: int = 64, seed: int = 0, seq_len: int | None = None,
               log: Callable[[str], None] | None = None, progress: Callable[[int], None] | None = None,
               **options: Any) -> tuple[list[str], torch.Tensor, dict]:
        """num_samples texts from nothing: (texts, ids [num_samples, seq_len], the record of how);
        progress: called after each step (each token for a causal method)."""
        return self.sample_from(self.sampler(steps, seed, seq_len, log, **options), num_samples, progress)

    def sample_from(self, sampler: CheckpointSampler, num_samples: int = 1,
                    progress: Callable[[int], None] | None = None) -> tuple[list[str], torch.Tensor, dict]:
        """sample() with a sampler of self.sampler(...), at its steps and seed."""
        steps, seed = sampler.info["steps"], sampler.info["seed"]
        ids = sampler.generate(num_samples, steps, seed, progress)
        info = {**sampler.info, "nfe": calls_made(sampler.method, steps, sampler.seq_len), "prompt": None}
        return [self.tokenizer.decode(row.tolist()) for row in ids], ids, info

    def generate(self, num_samples: int = 1, prompt: str | Sequence[int] | None = None, *, steps: int = 64,
                 seed: int = 0, seq_len: int | None = None, return_ids: bool = False,
                 **options: Any) -> list[str] | tuple[list[str], torch.Tensor]:
        """num_samples texts, each starting with `prompt` (text or token ids, clamped at every step) if given.

        With a prompt, a text is the prompt and its reply up to the reply's first end-of-text.
        return_ids=True returns (texts, ids [num_samples, seq_len]).
        """
        if prompt is None:
            texts, ids, _ = self.sample(num_samples, steps, seed, seq_len, **options)
            return (texts, ids) if return_ids else texts
        sampler = self.sampler(steps, seed, seq_len, **options)
        return self._fill(sampler, continuation(prompt, self.tokenizer, sampler.seq_len), num_samples, steps, seed,
                          return_ids)

    def infill(self, text: str, num_samples: int = 1, *, steps: int = 64, seed: int = 0, seq_len: int | None = None,
               return_ids: bool = False, **options: Any) -> list[str] | tuple[list[str], torch.Tensor]:
        """num_samples copies of `text` with its holes filled (`<|hole:N|>`, a line of `<|hole-line:N|>`;
        klflow.infill); the given text never changes. return_ids=True returns (texts, ids)."""
        sampler = self.sampler(steps, seed, seq_len, **options)
        return self._fill(sampler, parse_holes(text, self.tokenizer), num_samples, steps, seed, return_ids)

    def _fill(self, sampler: CheckpointSampler, template: Template, num_samples: int, steps: int, seed: int,
              return_ids: bool) -> list[str] | tuple[list[str], torch.Tensor]:
        (filled,) = sampler.fill([template], num_samples, steps, seed)
        texts = [sample.text for sample in filled]
        return (texts, _ids(filled)) if return_ids else texts

    def _validation_batches(self, seq_len: int) -> list:
        """Validation sequences of the data the checkpoint was trained on (for switch_entropy=data)."""
        config = self.checkpoint.experiment()
        data_dir = self.checkpoint.config.get("data_dir")
        try:
            data = PreparedData.load(data_dir)
        except (KLFlowError, TypeError):
            raise KLFlowError(f"switch_entropy=data calibrates on the checkpoint's validation data, not found at {data_dir}") from None
        return validation_batches(data, config.data.layout, seq_len, config.train.eval_windows,
                                  min(16, config.train.eval_windows))

    # ---------------------------------------------------------------- the Hub's format

    def _save_pretrained(self, save_directory: Path) -> None:
        """The checkpoint's files from the model in memory (no optimizer state), and a fresh model card."""
        if (save_directory / LATEST).exists() or (save_directory / "trainer.pt").exists():
            raise KLFlowError(f"{save_directory} holds a training run or checkpoint; export to another folder")
        ckpt = self.checkpoint
        record = {k: v for k, v in ckpt.config.items() if k not in ("format_version", "architecture")}
        state = {k: v for k, v in ckpt.state.items() if k != "model_sha256"}
        write_model_files(save_directory, self.model, record, self.tokenizer, state)
        self.generate_model_card(repo_id=save_directory.name).save(save_directory / "README.md")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> TrainedModel:
        """A folder in the Hub's format, or a Hub repo id (downloaded once into the Hub's cache; with
        HF_HUB_OFFLINE=1 or local_files_only=True, only the cache is read). device= as for __init__."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (EntryNotFoundError, HFValidationError, HfHubHTTPError) as err:
            where = "in the Hub's cache (offline)" if isinstance(err, FileNotFoundError) else "on the Hub"
            raise KLFlowError(f"{pretrained_model_name_or_path}: no such local path, and no klflow model {where} "
                              f"({type(err).__name__})") from None

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         device: str | torch.device = "auto", **_: Any) -> TrainedModel:
        """A local folder as it is; a repo id's files through the Hub's cache (offline: the cache only)."""
        folder = Path(model_id)
        if not folder.is_dir():
            files = [hf_hub_download(model_id, name, revision=revision, cache_dir=cache_dir,
                                     force_download=force_download, local_files_only=local_files_only, token=token)
                     for name in HUB_FILES]
            folder = Path(files[0]).parent
        return cls(folder, device)

    def generate_model_card(self, *args: Any, **kwargs: Any):
        """The model card: method, data, size, training steps and validation loss, and how to load it."""
        ckpt = self.checkpoint
        config = ckpt.experiment()
        val_loss = ckpt.state.get("val_loss")
        # A corpus name as it is; a local file or folder by its name (the rest of its path is the trainer's).
        data = Path(str(config.data.source or config.data.dir)).name
        facts = {
            "title": f"{config.method.name} text generator trained on {data} (klflow)",
            "method": config.method.name,
            "method_description": METHOD_DESCRIPTIONS.get(config.method.name, config.method.name),
            "data": data,
            "tokenizer": config.data.tokenizer,
            "vocab_size": self.tokenizer.vocab_size,
            "parameters": f"{self.model.num_parameters() / 1e6:.2f}M",
            "n_layer": config.model.n_layer,
            "d_model": config.model.d_model,
            "seq_len": config.train.seq_len,
            "steps": f"{ckpt.state.get('step', 0):,}",
            "tokens": f"{ckpt.state.get('tokens', 0):,}",
            "val_loss": "not measured" if val_loss is None else f"{val_loss:.4f} nats/token",
            "repo_id": "PATH_OR_REPO_ID",
        }
        return super().generate_model_card(*args, **{**facts, **kwargs})


def _ids(filled: list[Filled]) -> torch.Tensor:
    return torch.tensor([sample.ids for sample in filled], dtype=torch.long)
