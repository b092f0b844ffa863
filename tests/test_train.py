import json
import math

import pytest
import torch
from conftest import TINY_OVERRIDES, overfit
from safetensors.torch import load_file

from klflow.checkpoint import load_checkpoint
from klflow.config import load_config
from klflow.errors import KLFlowError
from klflow.flow.path import KLPath
from klflow.flow.validation import (
    BAND_EDGES,
    band_key,
    banded_validation,
    stratified_times,
)
from klflow.model import Denoiser
from klflow.runtime import build_optimizers
from klflow.train import lr_scale, train


def tiny_config(corpus, *extra):
    return load_config("quickstart", [f"data.source={json.dumps(str(corpus))}", *TINY_OVERRIDES, *extra])


def test_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    path = KLPath(23, t_max=0.4)
    model = Denoiser(23, n_layer=2, n_head=2, d_model=32)
    ids = torch.randint(0, 23, (4, 12))
    (opt,) = build_optimizers(model, 3e-3, 0.02, [0.9, 0.95], 0.0, "adamw")
    start, end = overfit(path, model, ids, opt, 150, eval_t=torch.full((4,), 0.35))
    assert start > 2.8 and end < 0.5 * start


def test_muon_groups_block_matrices():
    model = Denoiser(23, n_layer=1, n_head=2, d_model=16)
    muon, adam = build_optimizers(model, 1e-3, 0.02, [0.9, 0.95], 0.0, "muon")
    assert isinstance(muon, torch.optim.Muon)
    in_blocks = {id(p) for p in model.blocks.parameters() if p.ndim == 2}
    assert {id(p) for p in muon.param_groups[0]["params"]} == in_blocks
    assert id(model.embed) in {id(p) for g in adam.param_groups for p in g["params"]}


def test_lr_schedule_warms_up_holds_and_warms_down():
    assert lr_scale(0, 0.0, 10, "warmdown", 0.3) == pytest.approx(0.1)
    assert lr_scale(50, 0.5, 10, "warmdown", 0.3) == 1.0
    assert lr_scale(85, 0.85, 10, "warmdown", 0.3) == pytest.approx(0.5)
    assert lr_scale(100, 1.0, 10, "warmdown", 0.3) == 0.0
    assert lr_scale(100, 1.0, 10, "constant", 0.3) == 1.0


def test_training_checkpoints_round_trip_with_identical_logits(tiny_corpus, tmp_path):
    result = train(tiny_config(tiny_corpus, "train.max_steps=6"), tmp_path / "run", progress=False, log=lambda _: None)
    assert result.steps == 6 and result.tokens == 6 * 8 * 16 and result.val_loss is not None
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-0000006"
    ckpt = load_checkpoint(tmp_path / "run")
    fresh = Denoiser(**ckpt.config["architecture"])
    fresh.load_state_dict(load_file(str(result.checkpoint / "model.safetensors")))
    x = torch.softmax(torch.randn(2, 16, ckpt.tokenizer.vocab_size), -1)
    t = torch.tensor([0.05, 0.2])
    assert torch.equal(ckpt.model(x, t), fresh.eval()(x, t))
    assert ckpt.experiment().train.max_steps == 6
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [5, 6]
    with pytest.raises(KLFlowError, match="--resume"):
        train(tiny_config(tiny_corpus, "train.max_steps=6"), tmp_path / "run", progress=False, log=lambda _: None)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tiny_corpus, tmp_path, optimizer):
    # a constant schedule: the stopped run must see the same learning rates as the full one
    extra = [f"train.optimizer={optimizer}", "model.dropout=0.1", "train.schedule=constant"]
    full = train(tiny_config(tiny_corpus, "train.max_steps=10", *extra), tmp_path / "full", progress=False, log=lambda _: None)
    train(tiny_config(tiny_corpus, "train.max_steps=4", *extra), tmp_path / "split", progress=False, log=lambda _: None)
    resumed = train(tiny_config(tiny_corpus, "train.max_steps=10", *extra), tmp_path / "split", resume=True,
                    progress=False, log=lambda _: None)
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.tokens == full.tokens


def test_damaged_checkpoints_are_clear_errors(tiny_corpus, tmp_path):
    result = train(tiny_config(tiny_corpus, "train.max_steps=2"), tmp_path / "run", progress=False, log=lambda _: None)
    weights = result.checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(KLFlowError, match="checksum"):
        load_checkpoint(tmp_path / "run")
    (result.checkpoint / "state.json").write_text("{not json")
    with pytest.raises(KLFlowError, match="not valid JSON"):
        load_checkpoint(result.checkpoint)
    with pytest.raises(KLFlowError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(KLFlowError, match="not a klflow checkpoint"):
        load_checkpoint(tmp_path)


def prepared_pairs(tmp_path):
    """A prepared prompt -> response corpus of 300 short pairs."""
    from klflow.data import SourceOptions, prepare

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"question {i} about the {w}?", "response": f"the {w} is number {i}."}
            for i in range(150) for w in ("cat", "tree")]
    pairs.write_text("\n".join(json.dumps(r) for r in rows))
    return prepare(str(pairs), tmp_path / "data", vocab_size=300, options=SourceOptions(prompt_field="prompt",
                   response_field="response"), progress=False)


@pytest.mark.parametrize("layout", ["packed", "padded", "pairs", "infill"])
def test_training_runs_from_every_batch_layout(tmp_path, layout):
    data = prepared_pairs(tmp_path)
    config = load_config("quickstart", [f"data.dir={json.dumps(str(data.dir))}", *TINY_OVERRIDES,
                                        f"data.layout={layout}", "train.max_steps=3"])
    result = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    assert result.steps == 3 and math.isfinite(result.val_loss)


def test_pairs_layout_reports_the_free_position_loss(tmp_path):
    data = prepared_pairs(tmp_path)
    config = load_config("quickstart", [f"data.dir={json.dumps(str(data.dir))}", *TINY_OVERRIDES,
                                        "data.layout=pairs", "train.max_steps=5"])
    result = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    last = result.history[-1]
    # given prompt positions are cheap to predict (they are the input), so the free loss is higher
    assert last["val_loss_free"] > last["val_loss"] > 0


def test_evidence_input_and_power_time_train_record_and_reload(tiny_corpus, tmp_path):
    config = tiny_config(tiny_corpus, "train.max_steps=3", 'model.input="evidence"', 'path.time_sampling="power"')
    result = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    last = result.history[-1]
    assert [band_key(lo, hi) in last for lo, hi in zip(BAND_EDGES, BAND_EDGES[1:])] == [True] * 5
    config_file = result.checkpoint / "config.json"
    recorded = json.loads(config_file.read_text())
    assert recorded["architecture"]["input"] == "evidence" and recorded["architecture"]["path_beta"] == 0.01
    assert recorded["method"]["time_sampling"] == "power" and recorded["method"]["time_power"] == 2.0
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.model.input == "evidence" and ckpt.experiment().path.time_sampling == "power"
    # a checkpoint written before the option existed has neither key: it is the paper's simplex input
    for key in ("input", "path_beta"):
        del recorded["architecture"][key]
    del recorded["experiment"]["model"]["input"]
    config_file.write_text(json.dumps(recorded))
    old = load_checkpoint(result.checkpoint)
    assert old.model.input == "simplex" and old.experiment().model.input == "simplex"


def test_banded_validation_estimates_the_uniform_t_loss_and_each_band():
    """A model whose cross-entropy for token 0 is a fixed function f(t): val_loss must be the mean
    of f over U(0, t_max) and each band's score the mean of f over the band."""
    path = KLPath(5, beta=0.01, t_max=0.3)
    scores = torch.tensor([3.0, 1.0, 0.0, -1.0, 2.0])

    def model(x, t):
        return (scores * (1.0 - 8.0 * t[:, None, None])).expand(*x.shape)

    def band_mean(lo, hi):
        t = torch.linspace(lo, hi, 2001)[:-1] * path.t_max + (hi - lo) * path.t_max / 4000
        return (-torch.log_softmax(scores * (1.0 - 8.0 * t[:, None]), -1)[:, 0]).mean().item()

    batches = [(torch.zeros(37, 3, dtype=torch.long), None)] * 300  # 11100 sequences, 2220 per band
    result = banded_validation(model, path, batches, torch.device("cpu"))
    assert result["val_loss"] == pytest.approx(band_mean(0.0, 1.0), abs=0.01)
    for lo, hi in zip(BAND_EDGES, BAND_EDGES[1:]):
        assert result[band_key(lo, hi)] == pytest.approx(band_mean(lo, hi), abs=0.03)
    band, t = stratified_times(7, 3, BAND_EDGES, 0.3, torch.Generator().manual_seed(0))
    assert band.tolist() == [3, 4, 0, 1, 2, 3, 4]
    lows = torch.tensor(BAND_EDGES)[band] * 0.3
    assert ((t >= lows) & (t < lows + 0.06)).all()
