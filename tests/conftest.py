import os
import random

import pytest

for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[name] = "1"


@pytest.fixture(scope="session", autouse=True)
def klflow_home(tmp_path_factory):
    """Keep the data cache of the whole session out of the user's home."""
    home = tmp_path_factory.mktemp("klflow-home")
    os.environ["KLFLOW_HOME"] = str(home)
    return home


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
