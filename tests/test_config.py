import json

import pytest
import torch

import klflow.config

from conftest import TINY_OVERRIDES
from klflow.checkpoint import load_checkpoint
from klflow.config import Config, apply_overrides, load_config, preset_names
from klflow.errors import KLFlowError
from klflow.methods import SpecialTokens, build_method
from klflow.runtime import build_model
from klflow.train import train


def test_defaults_and_presets_validate():
    Config().validate()
    assert {"quickstart", "gpt2-small-150m", "gpt2-xl-1.5b"} <= set(preset_names())
    config = load_config("quickstart")
    assert config.data.source == "chitchat" and config.train.precision == "auto"
    assert load_config("gpt2-small-150m").model.d_model == 768
    big = load_config("gpt2-xl-1.5b")
    assert big.model.d_model // big.model.n_head == 64 and big.train.batch_size == 128


def test_dotted_overrides_are_typed():
    config = load_config("quickstart", ["train.lr=3e-4", "model.n_layer=2", "data.source=chitchat", "path.t_max=0.3",
                                        "train.betas=[0.8, 0.9]", "train.max_minutes=1"])
    assert config.train.lr == 3e-4 and config.model.n_layer == 2 and config.path.t_max == 0.3
    assert config.train.betas == [0.8, 0.9] and config.train.max_minutes == 1.0
    assert load_config(None, ["path.t_max=none"]).path.t_max is None


@pytest.mark.parametrize("override, message", [
    ("train.foo=1", "unknown config key 'train.foo'"),
    ("optim.lr=1", "unknown config key 'optim'"),
    ("train.lr=fast", "train.lr must be a number"),
    ("model.n_layer=2.5", "model.n_layer must be an integer"),
    ("train.max_steps=true", "train.max_steps must be an integer"),
    ("path.t_max=1.0", "path.t_max must lie in"),
    ("path.beta=0", "path.beta must lie in"),
    ("path.beta=1.5", "path.beta must lie in"),
    ("model.d_model=30", "heads of even size"),
    ("train.optimizer=sgd", "train.optimizer"),
    ("train.max_steps=0", "train.max_steps"),
    ("data.vocab_size=100", "data.vocab_size"),
    ("nokey", "must look like key=value"),
    ("train=1", "section.key=value"),
    ("model.input=logits", "model.input must be one of simplex, evidence"),
    ("path.time_sampling=cosine", "path.time_sampling must be one of uniform, power"),
    ("path.time_power=0.5", "path.time_power must be > 0.5"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(KLFlowError, match=message):
        load_config("quickstart", [override])


def test_evidence_input_and_time_sampling_are_klflow_options():
    config = load_config("quickstart", ["model.input=evidence", "path.time_sampling=power", "path.time_power=3"])
    assert config.model.input == "evidence" and config.path.time_sampling == "power" and config.path.time_power == 3.0
    defaults = load_config("quickstart")
    assert defaults.denoiser_input == "evidence" and defaults.path.time_sampling is None  # the method's default
    assert load_config("quickstart", ["method.name=dfm"]).denoiser_input == "simplex"  # the default follows the method
    assert load_config("quickstart", ["model.input=simplex"]).denoiser_input == "simplex"
    assert load_config("quickstart", ["model.input=evidence", "method.name=fisher-rao"]).denoiser_input == "evidence"
    with pytest.raises(KLFlowError, match="model.input='evidence' needs method.name among klflow, linear-simplex"):
        load_config("quickstart", ["model.input=evidence", "method.name=dfm"])
    with pytest.raises(KLFlowError, match="path.time_sampling='power' needs method.name='klflow'"):
        load_config("quickstart", ["path.time_sampling=power", "method.name=mdlm"])


def test_baseline_hyperparameters_default_to_the_papers_and_change_the_methods():
    specials = SpecialTokens(eot=0, pad=1, mask=2)
    build = lambda name, *overrides: build_method(name, load_config("quickstart", [f"method.name={name}", *overrides]),
                                                  300, specials)
    for name in ("linear-simplex", "fisher-rao"):
        assert build(name).t_end == 0.99
        method = build(name, "method.simplex_t_max=0.9")
        assert method.time_grid(4)[-1] == 0.9 and method.describe()["t_max"] == 0.9
        assert method.sample_time(1000, torch.Generator().manual_seed(0), "cpu").max() < 0.9
    assert (build("dirichlet").alpha_max, build("dirichlet").alpha_scale) == (20.0, 5.0)
    dirichlet = build("dirichlet", "method.alpha_max=10", "method.alpha_scale=2")
    assert (dirichlet.alpha_max, dirichlet.alpha_scale) == (10.0, 2.0)
    for name in ("mdlm", "sedd"):
        assert build(name).t_min == 1e-3 and build(name, "method.t_min=0.05").describe()["t_min"] == 0.05
    assert build("dfm").nfe(8, 16) == 7
    cubic = build("dfm", "method.kappa_power=3")
    assert cubic.nfe(8, 16) == 6 and cubic.describe()["scheduler"] == "kappa(t) = 1 - (1 - t)^3"
    for override, message in [("method.simplex_t_max=1.0", r"method.simplex_t_max must lie in \(0, 1\)"),
                              ("method.alpha_max=0", "method.alpha_max and method.alpha_scale must be > 0"),
                              ("method.t_min=0", r"method.t_min must lie in \(0, 1\)"),
                              ("method.kappa_power=0.5", "method.kappa_power must be >= 1"),
                              ("method.t_min=small", "method.t_min must be a number")]:
        with pytest.raises(KLFlowError, match=message):
            load_config("quickstart", [override])


def test_baseline_hyperparameters_round_trip_through_a_checkpoint(tiny_corpus, tmp_path):
    config = load_config("quickstart", [f"data.source={json.dumps(str(tiny_corpus))}", *TINY_OVERRIDES,
                                        "train.max_steps=2", "method.name=fisher-rao", "method.simplex_t_max=0.9"])
    run = train(config, tmp_path / "run", progress=False, log=lambda _: None)
    ckpt = load_checkpoint(run.checkpoint)
    assert ckpt.experiment().method.simplex_t_max == 0.9
    assert build_method("fisher-rao", ckpt.experiment(), 300, SpecialTokens(eot=0, pad=1, mask=2)).t_end == 0.9
    # A checkpoint written before these keys existed loads with the papers' values.
    saved = json.loads((run.checkpoint / "config.json").read_text())
    saved["experiment"]["method"] = {"name": "fisher-rao"}
    (run.checkpoint / "config.json").write_text(json.dumps(saved))
    assert load_checkpoint(run.checkpoint).experiment().method.simplex_t_max == 0.99


def test_files_and_unknown_presets(tmp_path):
    good = tmp_path / "c.toml"
    good.write_text("[train]\nlr = 0.01\n")
    assert load_config(str(good)).train.lr == 0.01
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = ")
    with pytest.raises(KLFlowError, match="invalid TOML"):
        load_config(str(bad))
    with pytest.raises(KLFlowError, match="unknown preset"):
        load_config("nonexistent")
    with pytest.raises(KLFlowError, match="not found"):
        load_config(str(tmp_path / "missing.toml"))


def test_round_trip_through_dict():
    config = load_config("quickstart", ["train.lr=0.5"])
    assert Config.from_dict(config.to_dict()) == config
    assert apply_overrides(config.to_dict(), ["train.lr=0.25"]).train.lr == 0.25


@pytest.mark.parametrize("output, self_conditioning, time_sampling", [
    ("plain", False, "uniform"), ("residual", True, "alpha")])
def test_unset_levers_follow_klflow_s_defaults_and_stay_off_for_the_other_methods(monkeypatch, output,
                                                                                   self_conditioning, time_sampling):
    monkeypatch.setattr(klflow.config, "KLFLOW_OUTPUT", output)
    monkeypatch.setattr(klflow.config, "KLFLOW_SELF_CONDITIONING", self_conditioning)
    monkeypatch.setattr(klflow.config, "KLFLOW_TIME_SAMPLING", time_sampling)
    klflow_config = Config()
    assert (klflow_config.denoiser_output, klflow_config.self_conditioned,
            klflow_config.training_time_sampling) == (output, self_conditioning, time_sampling)
    for name in ("ar", "mdlm", "dfm", "sedd", "dirichlet"):
        config = apply_overrides({}, [f'method.name="{name}"'])
        assert (config.denoiser_output, config.self_conditioned, config.training_time_sampling) == \
            ("plain", False, "uniform"), name
    simplex = apply_overrides({}, ['model.input="simplex"'])
    assert simplex.denoiser_output == "plain"  # the residual adds the evidence input's log q
    given = apply_overrides({}, ['model.output="plain"', "model.self_conditioning=false",
                                 'path.time_sampling="learned"'])
    assert (given.denoiser_output, given.self_conditioned, given.training_time_sampling) == ("plain", False, "learned")
    model = build_model(klflow_config, 64, causal=False)
    assert (model.output, model.self_conditioning) == (output, self_conditioning)
    kind = build_method("klflow", klflow_config, 64, SpecialTokens(eot=0, pad=1, mask=2)).time_sampling.kind
    assert kind == time_sampling


def test_a_checkpoint_keeps_the_time_sampling_it_trained_with_when_the_default_moves(tiny_run, monkeypatch):
    ckpt = load_checkpoint(tiny_run)
    assert ckpt.config["experiment"]["path"]["time_sampling"] is None  # unset: klflow's default
    monkeypatch.setattr(klflow.config, "KLFLOW_TIME_SAMPLING", "learned")
    assert ckpt.experiment().path.time_sampling == ckpt.config["method"]["time_sampling"] == "alpha"
