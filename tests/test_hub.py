"""The Hub's model format: klflow export / save_pretrained, from_pretrained of a folder or a cached repo id, offline."""

import json
import shutil

import huggingface_hub.constants
import pytest
import torch

import klflow
from conftest import TINY_OVERRIDES
from klflow.cli import main
from klflow.config import load_config
from klflow.errors import KLFlowError
from klflow.train import train
from klflow.trained import HUB_FILES, TrainedModel


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    config = load_config("quickstart", [f"data.source={json.dumps(str(tiny_corpus))}", *TINY_OVERRIDES,
                                        "train.max_steps=5"])
    directory = tmp_path_factory.mktemp("hub") / "run"
    train(config, directory, progress=False, log=lambda _: None)
    return directory


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def logits(model: TrainedModel) -> torch.Tensor:
    x = torch.softmax(torch.randn(2, 16, model.tokenizer.vocab_size, generator=torch.Generator().manual_seed(0)), -1)
    return model.model(x, torch.tensor([0.05, 0.2]))


def test_export_writes_the_hub_format_with_a_model_card(run, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    assert "in the Hub's format" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([*HUB_FILES, "README.md"])  # no optimizer state
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"]["vocab_size"] == 300 and config["experiment"]["method"]["name"] == "klflow"
    state = json.loads((out / "state.json").read_text())
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: klflow" in card and "pipeline_tag: text-generation" in card
    assert "| method | `klflow` |" in card and f"| data | `{tiny_corpus.name}`" in card
    assert f"| training | {state['step']} optimizer steps" in card and state["step"] == 5
    assert f"| validation loss | {state['val_loss']:.4f} nats/token |" in card


def test_round_trip_gives_identical_logits_offline(run, tmp_path):
    original = klflow.load(run, device="cpu")
    original.save_pretrained(tmp_path / "export")
    for loaded in (TrainedModel.from_pretrained(tmp_path / "export", device="cpu"), klflow.load(tmp_path / "export")):
        assert torch.equal(logits(loaded), logits(original))
        assert loaded.generate(2, steps=2) == original.generate(2, steps=2)
        assert loaded.checkpoint.state["step"] == 5


def test_a_repo_id_loads_from_the_hubs_cache_offline(run, tmp_path):
    """The layout hf_hub_download leaves in its cache: models--OWNER--NAME/{refs/main, snapshots/COMMIT/...}."""
    klflow.load(run).save_pretrained(tmp_path / "export")
    repo = tmp_path / "cache" / "models--someone--tiny-klflow"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tmp_path / "export", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = TrainedModel.from_pretrained("someone/tiny-klflow", cache_dir=tmp_path / "cache", device="cpu")
    assert torch.equal(logits(loaded), logits(klflow.load(run)))
    with pytest.raises(KLFlowError, match="someone/other: no such local path, and no klflow model in the Hub's cache"):
        TrainedModel.from_pretrained("someone/other", cache_dir=tmp_path / "cache")


def test_save_pretrained_writes_the_model_in_memory(run, tmp_path):
    model = klflow.load(run)
    with torch.no_grad():
        next(model.model.parameters()).mul_(2.0)
    model.save_pretrained(tmp_path / "changed")
    assert torch.equal(logits(klflow.load(tmp_path / "changed")), logits(model))
    assert not torch.equal(logits(klflow.load(run)), logits(model))


def test_export_never_writes_into_a_run(run, capsys):
    assert main(["export", str(run), str(run)]) == 2
    assert main(["export", str(run), str(next(run.glob("step-*")))]) == 2
    assert "holds a training run or checkpoint" in capsys.readouterr().err
