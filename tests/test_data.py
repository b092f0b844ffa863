import json
import random
import re
import time

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from klflow.data import (
    SPECIAL_TOKENS,
    PreparedData,
    RandomWindows,
    TextTokenizer,
    default_data_dir,
    klflow_home,
    load_corpus,
    prepare,
    validation_windows,
)
from klflow.errors import KLFlowError

WORDS = (
    "the a small quiet old bright river forest city robot teacher cat dog song letter window "
    "runs sings waits builds finds remembers carries watches under over near beyond before after "
    "slowly gladly today tomorrow yesterday because although while café naïve déjà"
).split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """Varied synthetic documents: 1-3 sentences of 4-14 words, some with a line break."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        parts = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
            for _ in range(rng.randint(1, 3))
        ]
        docs.append(f"{i}: " + ("\n" if i % 5 == 0 else " ").join(parts))
    return docs


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("KLFLOW_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train(sentences(300), vocab_size=320)


@pytest.fixture
def corpus_file(tmp_path):
    docs = sentences(200)
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path, docs


def shard_documents(data: PreparedData, tokens: np.ndarray) -> list[str]:
    """Decode a shard back into its documents, one per end-of-text-terminated run."""
    tok = data.tokenizer()
    assert tokens[-1] == tok.eot_id
    runs = np.split(np.asarray(tokens), np.flatnonzero(tokens == tok.eot_id) + 1)[:-1]
    return [tok.decode(run[:-1].tolist()) for run in runs]


# --- corpus -----------------------------------------------------------------------------------


def test_chitchat_loads_conversations_with_turns_on_lines():
    corpus = load_corpus("chitchat")
    assert corpus.name == "chitchat"
    assert len(corpus.documents) > 5000
    assert corpus.replaced_chars == 0
    assert all(doc.strip() for doc in corpus.documents)
    # About 3150 of the 7168 conversations have a single turn, so no newline.
    assert sum("\n" in doc for doc in corpus.documents) > len(corpus.documents) // 2
    assert corpus.documents[0].startswith("Hello How are you doing today?\n")


def test_folder_reads_text_counts_replacements_and_skips_hidden_and_binary(tmp_path, capsys):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("first document\n\nstill the first\n", encoding="utf-8")
    (root / "sub" / "b.md").write_bytes(b"bad \xff\xfe bytes")
    (root / "sub" / "c.jsonl").write_text('{"text": "from jsonl"}\n{"text": "  "}\n', encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (root / ".git" / "config").write_text("hidden too", encoding="utf-8")
    (root / "image.bin").write_bytes(b"\x89PNG\0\0\0data")
    corpus = load_corpus(str(root))
    assert corpus.documents == ["first document\n\nstill the first", "bad \ufffd\ufffd bytes", "from jsonl"]
    assert corpus.replaced_chars == 2
    assert "skipped 1 binary file" in capsys.readouterr().err


def test_single_file_splits_on_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("one\nline two\n\n\n  \nthree\r\n\r\nfour\n", encoding="utf-8")
    assert load_corpus(str(path)).documents == ["one\nline two", "three", "four"]


def test_single_binary_file_is_an_error(tmp_path):
    path = tmp_path / "blob.txt"
    path.write_bytes(b"text\0more")
    with pytest.raises(KLFlowError, match="binary"):
        load_corpus(str(path))


def test_jsonl_text_field(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "alpha", "id": 1}\n\n{"text": "beta\\ngamma"}\n', encoding="utf-8")
    assert load_corpus(str(good)).documents == ["alpha", "beta\ngamma"]

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "alpha"}\n{"body": "beta"}\n', encoding="utf-8")
    with pytest.raises(KLFlowError, match="line 2"):
        load_corpus(str(missing))

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "alpha"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(KLFlowError, match="line 2 is not valid JSON"):
        load_corpus(str(broken))


def test_missing_path_and_empty_corpus(tmp_path):
    with pytest.raises(KLFlowError, match="data path not found"):
        load_corpus(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text(" \n\n\t\n", encoding="utf-8")
    with pytest.raises(KLFlowError, match="is empty"):
        load_corpus(str(empty))


# --- tokenizer --------------------------------------------------------------------------------


def test_special_token_ids(tokenizer):
    assert (tokenizer.eot_id, tokenizer.pad_id, tokenizer.mask_id) == (0, 1, 2)
    assert tokenizer.vocab_size == 320
    assert [tokenizer.decode([i]) for i in range(3)] == ["\n", "", ""]


def test_encode_decode_round_trip(tokenizer):
    text = "The quiet robot sings, café déjà vu! 日本語 🙂\n  indented <|endoftext|> stays text"
    ids = tokenizer.encode(text)
    assert tokenizer.eot_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, "cat"]) == [ids, tokenizer.encode("cat")]


def test_decode_drops_pad_mask_and_breaks_at_end_of_text(tokenizer):
    ids = tokenizer.encode("first doc") + [tokenizer.eot_id] + tokenizer.encode("second") + [1, 2, 1]
    assert tokenizer.decode(ids) == "first doc\nsecond"
    assert tokenizer.decode(torch.tensor(ids)) == "first doc\nsecond"


def test_save_load_keeps_fingerprint(tokenizer, tmp_path):
    path = tmp_path / "tok.json"
    tokenizer.save(path)
    loaded = TextTokenizer.from_file(path)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert len(tokenizer.fingerprint) == 16
    assert loaded.encode("the river") == tokenizer.encode("the river")


def test_from_file_errors(tmp_path):
    with pytest.raises(KLFlowError, match="not found"):
        TextTokenizer.from_file(tmp_path / "absent.json")
    junk = tmp_path / "junk.json"
    junk.write_text("{not a tokenizer", encoding="utf-8")
    with pytest.raises(KLFlowError, match="not a tokenizer"):
        TextTokenizer.from_file(junk)
    foreign = Tokenizer(models.BPE())
    foreign.add_special_tokens(["<s>", "</s>"])
    foreign.save(str(tmp_path / "foreign.json"))
    with pytest.raises(KLFlowError, match=re.escape(f"tokenizer has no {', '.join(SPECIAL_TOKENS)} token")):
        TextTokenizer.from_file(tmp_path / "foreign.json")


def test_vocab_size_limits():
    with pytest.raises(KLFlowError, match="at least 259"):
        TextTokenizer.train(["some text"], vocab_size=258)
    with pytest.raises(KLFlowError, match="larger than this corpus supports"):
        TextTokenizer.train(["tiny corpus", "very tiny"], vocab_size=5000)


# --- prepare ----------------------------------------------------------------------------------


def test_default_dirs(tmp_path):
    assert klflow_home() == tmp_path / "home"
    assert default_data_dir("chitchat", 1024) == tmp_path / "home" / "data" / "chitchat-bpe1024"
    mine = default_data_dir(str(tmp_path / "my corpus!.txt"), 512)
    assert mine.parent == tmp_path / "home" / "data"
    assert mine.name.startswith("my_corpus_txt-") and mine.name.endswith("-bpe512")
    assert default_data_dir(str(tmp_path / "other" / "my corpus!.txt"), 512) != mine


def test_prepare_shards_hold_exactly_the_documents(corpus_file):
    path, docs = corpus_file
    data = prepare(str(path), vocab_size=300, val_fraction=0.1, progress=False)
    assert data.dir == default_data_dir(str(path), 300)
    meta = data.meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert (meta["n_documents"], meta["n_train_documents"], meta["n_val_documents"]) == (200, 180, 20)

    train, val = data.train_tokens(), data.val_tokens()
    assert train.dtype == np.uint16 and not train.flags.writeable
    assert next(RandomWindows(train, 16, 4)).ids.shape == (4, 16)
    assert (len(train), len(val)) == (meta["n_train_tokens"], meta["n_val_tokens"])
    train_docs, val_docs = shard_documents(data, train), shard_documents(data, val)
    assert len(train_docs) == 180 and len(val_docs) == 20
    assert sorted(train_docs + val_docs) == sorted(docs)
    assert not set(train_docs) & set(val_docs)
    assert meta["n_bytes"] == sum(len(d.encode()) for d in docs)
    assert meta["tokenizer_fingerprint"] == data.tokenizer().fingerprint

    reloaded = PreparedData.load(data.dir)
    assert reloaded.meta == meta


def test_same_seed_same_split_other_seed_other_split(corpus_file, tmp_path):
    path, _ = corpus_file

    def val_docs(name: str, seed: int) -> list[str]:
        data = prepare(str(path), tmp_path / name, vocab_size=300, seed=seed, progress=False)
        return shard_documents(data, data.val_tokens())

    assert val_docs("a", 0) == val_docs("b", 0)
    assert val_docs("a", 0) != val_docs("c", 1)


def test_prepare_reuses_cache_until_parameters_or_source_change(corpus_file, tmp_path):
    path, docs = corpus_file
    out = tmp_path / "out"
    prepare(str(path), out, vocab_size=300, progress=False)
    stamps = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    time.sleep(0.01)

    again = prepare(str(path), out, vocab_size=300, progress=False)
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamps
    assert again.meta["n_documents"] == 200

    path.write_text("\n\n".join(docs[:100]), encoding="utf-8")
    assert prepare(str(path), out, vocab_size=300, progress=False).meta["n_documents"] == 100
    assert prepare(str(path), out, vocab_size=300, seed=3, progress=False).meta["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "out"]


def test_failed_prepare_leaves_no_output(corpus_file, tmp_path, monkeypatch):
    path, docs = corpus_file

    def broken_save(self, path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(TextTokenizer, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(str(path), tmp_path / "out", vocab_size=300, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_failed_rebuild_keeps_the_previous_output(corpus_file, tmp_path, monkeypatch):
    path, docs = corpus_file
    out = tmp_path / "out"
    prepare(str(path), out, vocab_size=300, progress=False)
    monkeypatch.setattr(TextTokenizer, "encode_batch", lambda self, texts: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        prepare(str(path), out, vocab_size=300, seed=1, progress=False)
    assert PreparedData.load(out).meta["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "out"]


def test_prepare_argument_errors(corpus_file, tmp_path):
    path, _ = corpus_file
    with pytest.raises(KLFlowError, match="val_fraction"):
        prepare(str(path), tmp_path / "out", val_fraction=1.0)
    with pytest.raises(KLFlowError, match="at least 259"):
        prepare(str(path), tmp_path / "out", vocab_size=100)
    with pytest.raises(KLFlowError, match="data path not found"):
        prepare(str(tmp_path / "absent"), tmp_path / "out")
    single = tmp_path / "single.txt"
    single.write_text("just one paragraph", encoding="utf-8")
    with pytest.raises(KLFlowError, match="needs 2"):
        prepare(str(single), tmp_path / "out")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(KLFlowError, match="not a klflow data folder"):
        prepare(str(path), keep, vocab_size=300, progress=False)
    assert not (tmp_path / "out").exists()


def test_load_errors_hint_at_prepare(corpus_file, tmp_path):
    with pytest.raises(KLFlowError, match="klflow prepare"):
        PreparedData.load(tmp_path / "nothing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(KLFlowError, match="malformed.*klflow prepare"):
        PreparedData.load(broken)

    path, _ = corpus_file
    data = prepare(str(path), tmp_path / "out", vocab_size=300, progress=False)
    with open(data.dir / "val.bin", "r+b") as f:
        f.truncate(2)
    with pytest.raises(KLFlowError, match="truncated"):
        PreparedData.load(data.dir)


def test_replaced_chars_are_recorded_and_warned(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("\n\n".join(sentences(60)).encode("utf-8") + b"\n\nna\xefve caf\xe9\n")
    data = prepare(str(path), tmp_path / "out", vocab_size=270, progress=True)
    assert data.meta["replaced_chars"] == 2
    err = capsys.readouterr().err
    assert "2 undecodable bytes" in err
    assert "tokenizing" in err  # the progress bar


def test_prepare_chitchat(tmp_path):
    data = prepare("chitchat", vocab_size=1024, progress=False)
    assert data.dir == tmp_path / "home" / "data" / "chitchat-bpe1024"
    assert data.meta["source_identity"] == {"corpus": "chitchat", "version": "0.9.0"}
    assert data.meta["n_documents"] > 5000
    assert data.meta["n_val_documents"] == round(0.05 * data.meta["n_documents"])
    assert data.meta["n_train_tokens"] > 1_000_000
    assert int(data.train_tokens().max()) < 1024


# --- batches ----------------------------------------------------------------------------------


def test_random_windows_shapes_and_reproducibility():
    tokens = np.arange(1000, dtype=np.uint16)
    batch = next(RandomWindows(tokens, seq_len=16, batch_size=8, seed=5))
    assert batch.cond_mask is None
    assert batch.ids.shape == (8, 16) and batch.ids.dtype == torch.long
    assert int(batch.ids.min()) >= 0 and int(batch.ids.max()) < 1000
    # Windows are contiguous slices of the token array.
    assert torch.equal(batch.ids - batch.ids[:, :1], torch.arange(16).expand(8, 16))

    a, b = RandomWindows(tokens, 16, 8, seed=5), RandomWindows(tokens, 16, 8, seed=5)
    c = RandomWindows(tokens, 16, 8, seed=6)
    first = [next(a).ids for _ in range(3)]
    assert all(torch.equal(x, next(b).ids) for x in first)
    assert not torch.equal(first[0], next(c).ids)


def test_random_windows_reach_the_last_token():
    tokens = np.arange(10, dtype=np.uint16)
    seen = next(RandomWindows(tokens, 4, 64, seed=0)).ids
    assert int(seen.max()) == 9 and int(seen.min()) == 0


def test_random_windows_resume_from_state():
    tokens = np.random.default_rng(0).integers(0, 500, 5000).astype(np.uint16)
    stream = RandomWindows(tokens, 32, 4, seed=1)
    next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [next(stream).ids for _ in range(3)]

    resumed = RandomWindows(tokens, 32, 4, seed=99)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, next(resumed).ids) for x in expected)
    with pytest.raises(KLFlowError, match="state"):
        resumed.load_state_dict({"bit_generator": "nonsense"})


def test_random_windows_needs_more_tokens_than_seq_len():
    with pytest.raises(KLFlowError, match="only 16 tokens; need more than seq_len=16"):
        RandomWindows(np.zeros(16, dtype=np.uint16), 16, 2)


def test_validation_windows_are_deterministic_spread_and_disjoint():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = validation_windows(tokens, seq_len=30, max_windows=8)
    assert windows.shape == (8, 30) and windows.dtype == torch.long
    assert torch.equal(windows, validation_windows(tokens, 30, 8))
    starts = windows[:, 0].tolist()
    assert starts[0] == 0 and starts[-1] + 30 > 1000 - 30
    assert all(b - a >= 30 for a, b in zip(starts, starts[1:]))
    assert torch.equal(windows - windows[:, :1], torch.arange(30).expand(8, 30))

    every = validation_windows(tokens, 30, max_windows=1000)
    assert every.shape == (33, 30)
    assert len(set(every.flatten().tolist())) == 33 * 30
    assert validation_windows(tokens, 1000, 5).shape == (1, 1000)
    with pytest.raises(KLFlowError, match="need at least seq_len=1001"):
        validation_windows(tokens, 1001, 5)


def test_shards_index_documents_and_old_formats_ask_for_prepare(corpus_file, tmp_path):
    path, docs = corpus_file
    data = prepare(str(path), tmp_path / "out", vocab_size=300, progress=False)
    tok = data.tokenizer()
    for split in ("train", "val"):
        offsets, tokens = data.offsets(split), data.tokens(split)
        assert offsets[0] == 0 and offsets[-1] == len(tokens) and offsets.dtype == np.int64
        assert np.array_equal(np.flatnonzero(tokens == tok.eot_id) + 1, offsets[1:])
        assert not data.prompt_lengths(split).any()
    assert data.meta["format_version"] == 2 and data.meta["tokenizer"] == "bpe" and not data.meta["pairs"]

    np.save(data.dir / "val.idx.npy", np.arange(3))
    with pytest.raises(KLFlowError, match="document index of val .* damaged"):
        PreparedData.load(data.dir)
    meta = json.loads((data.dir / "meta.json").read_text())
    (data.dir / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(KLFlowError, match="data format 1; this klflow reads format 2 .*klflow prepare"):
        PreparedData.load(data.dir)
    rebuilt = prepare(str(path), tmp_path / "out", vocab_size=300, progress=False)
    assert not rebuilt.reused and PreparedData.load(rebuilt.dir).meta["n_documents"] == len(docs)
