"""The samplers' step observer and `klflow trace`'s page, replayed in a real headless Chromium."""

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_ARGS

from klflow.cli import main
from klflow.errors import KLFlowError
from klflow.filling import CheckpointSampler
from klflow.flow.path import KLPath
from klflow.flow.sampler import generate
from klflow.methods.base import SpecialTokens
from klflow.methods.dfm import DFM
from klflow.methods.masked import MDLM
from klflow.methods.sedd import SEDD
from klflow.trace import record_trace

V, L = 12, 6
SPECIALS = SpecialTokens(eot=0, pad=1, mask=2)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def simplex_model():
    weights = torch.randn(V, V, generator=torch.Generator().manual_seed(1)) * 3
    return lambda x, t: x @ weights + t[:, None, None]


def ids_model():
    table = torch.randn(V, L, V, generator=torch.Generator().manual_seed(2))
    return lambda x, t: table[x, torch.arange(x.shape[1])] + t[:, None, None]


@pytest.mark.parametrize("sampler", ["ode", "randomized", "hybrid"])
def test_klflow_observer_sees_every_step_and_changes_nothing(sampler):
    path, model, steps = KLPath(V, 0.05), simplex_model(), 5
    prompt = torch.tensor([[5, 6, 0, 0, 0, 0]])
    cond_mask = torch.tensor([[True, True, False, False, False, False]])

    def run(observe=None):
        return generate(model, path, 3, L, sampler=sampler, steps=steps, prompt=prompt, cond_mask=cond_mask,
                        generator=torch.Generator().manual_seed(0), observe=observe)

    frames = []
    ids = run(frames.append)
    assert torch.equal(ids, run())  # observing draws nothing and moves nothing
    assert [f.step for f in frames] == list(range(steps + 1)) and [f.nfe for f in frames] == list(range(1, steps + 2))
    assert [f.t for f in frames] == pytest.approx(path.tau_grid(steps).tolist()[:steps] + [path.t_max])
    assert torch.equal(frames[-1].tokens, ids)
    for frame in frames:
        assert frame.tokens.shape == frame.probabilities.shape == (3, L)
        assert bool(((frame.probabilities > 0) & (frame.probabilities <= 1)).all())
        assert bool((frame.tokens[:, :2] == prompt[:, :2]).all()) and bool((frame.probabilities[:, :2] == 1).all())


@pytest.mark.parametrize("method", [MDLM(V, SPECIALS), DFM(V, SPECIALS), SEDD(V, SPECIALS)], ids=["mdlm", "dfm", "sedd"])
def test_masked_observer_ends_on_the_sample(method):
    model, steps = ids_model(), 6

    def run(observe=None):
        return method.generate(model, 4, L, steps, generator=torch.Generator().manual_seed(0), observe=observe)

    frames = []
    ids = run(frames.append)
    assert torch.equal(ids, run())
    assert frames and torch.equal(frames[-1].tokens, ids) and bool((frames[-1].probabilities == 1).all())
    assert frames[-1].nfe == method.last_nfe and [f.step for f in frames] == list(range(len(frames)))
    assert not bool((frames[0].tokens == SPECIALS.mask).any())  # a masked position shows its top token
    assert bool((frames[0].probabilities < 1).any())


def test_a_method_without_steps_to_show_is_refused():
    method = SimpleNamespace(name="ar", generate=lambda model, num_samples, seq_len, steps, **options: None)
    sampler = CheckpointSampler(method, None, None, L, torch.device("cpu"), {}, {})
    with pytest.raises(KLFlowError, match="klflow trace replays klflow, mdlm"):
        record_trace(sampler, 1, 4, 0)


class Page(HTMLParser):
    """The text of every sequence box (by data-index) and of the elements with an id."""

    def __init__(self):
        super().__init__()
        self.sequences, self.by_id, self._open = {}, {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("class") == "sequence":
            self._open.append(("sequence", int(attrs["data-index"]), tag))
        elif "id" in attrs:
            self._open.append(("id", attrs["id"], tag))
        else:
            self._open.append(None)

    def handle_endtag(self, tag):
        self._open.pop()

    def handle_data(self, data):
        for entry in self._open:
            if entry is not None:
                kind, key, _ = entry
                store = self.sequences if kind == "sequence" else self.by_id
                store[key] = store.get(key, "") + data


def trace_data(page: Path) -> dict:
    text = page.read_text()
    match = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', text, re.S)
    return json.loads(match.group(1).replace("<\\/", "</"))



def test_trace_page_is_self_contained_and_ends_on_the_sample(tiny_run, tmp_path, capsys):
    page = tmp_path / "trace.html"
    assert main(["trace", str(tiny_run), "--sample-steps", "4", "-n", "2", "--prompt", "The cat", "--out", str(page),
                 "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    html = page.read_text()
    assert not re.search(r"https?://|<link|<script[^>]*\bsrc=|@import|url\(", html)
    data = trace_data(page)
    samples = tmp_path / "s.jsonl"
    assert main(["sample", str(tiny_run), "--sample-steps", "4", "-n", "2", "--prompt", "The cat", "--out", str(samples),
                 "--no-progress"]) == 0
    ids = [json.loads(line)["ids"] for line in samples.read_text().splitlines()]
    assert data["frames"][-1]["tokens"] == ids and len(data["frames"]) == 5 and data["frames"][-1]["nfe"] == 5


def test_trace_of_a_masked_baseline(tiny_corpus, tmp_path):
    run, page = tmp_path / "mdlm", tmp_path / "mdlm.html"
    assert main(["train", "--method", "mdlm", "--data", str(tiny_corpus), "--out", str(run), "--train-steps", "2",
                 "--no-progress", *TINY_ARGS]) == 0
    assert main(["trace", str(run), "--sample-steps", "5", "-n", "1", "--out", str(page), "--no-progress"]) == 0
    frames = trace_data(page)["frames"]
    assert trace_data(page)["method"] == "mdlm" and frames[-1]["p"] == [[1.0] * len(frames[-1]["p"][0])]
    assert min(frames[0]["p"][0]) < 1.0


def chromium(*args: str, profile: Path) -> str:
    run = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_trace_page_in_headless_chromium(tiny_run, tmp_path):
    page = tmp_path / "trace.html"
    assert main(["trace", str(tiny_run), "--sample-steps", "6", "-n", "2", "--out", str(page), "--no-progress"]) == 0
    data = trace_data(page)
    vocab, frames = data["vocab"], data["frames"]

    def expected(frame: dict) -> dict[int, str]:
        return {b: "".join(vocab[str(i)] for i in row) for b, row in enumerate(frame["tokens"])}

    assert expected(frames[0]) != expected(frames[-1])  # the check below can tell the two steps apart
    for address, frame in ((f"{page.as_uri()}#step=0", frames[0]), (f"{page.as_uri()}#step=last", frames[-1])):
        shown = Page()
        shown.feed(chromium("--dump-dom", address, profile=tmp_path / "profile"))
        assert shown.sequences == expected(frame), address
        assert shown.by_id["step-label"] == f"step {frame['step']} / {frames[-1]['step']}"
        assert shown.by_id["nfe"] == str(frame["nfe"]) and float(shown.by_id["t"]) == pytest.approx(frame["t"], abs=1e-4)
    artifacts = Path(os.environ.get("KLFLOW_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "trace-page.png"
    chromium("--window-size=1100,500", f"--screenshot={shot}", f"{page.as_uri()}#step=last", profile=tmp_path / "profile")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
