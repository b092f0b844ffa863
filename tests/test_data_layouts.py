"""Batch layouts: packed windows, padded documents, prompt/response pairs, infilling masks."""

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from klflow.data import (
    LAYOUTS,
    PreparedData,
    SourceOptions,
    TextTokenizer,
    make_batches,
    prepare,
    validation_batches,
    validation_windows,
)
from klflow.errors import KLFlowError

WORDS = "the cat dog runs sees a red ball over under quickly slowly big small river tree".split()


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("KLFLOW_HOME", str(tmp_path / "home"))


def _sentence(rng: random.Random, low: int = 3, high: int = 9) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> PreparedData:
    """120 documents of 2-60 words: many shorter than 16 tokens, some longer than 48."""
    rng = random.Random(1)
    texts = [f"{i} " + _sentence(rng, 1, 60) for i in range(120)]
    path = tmp_path_factory.mktemp("docs") / "docs.txt"
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return prepare(str(path), tmp_path_factory.mktemp("docs-out") / "d", vocab_size=300, val_fraction=0.25,
                   progress=False)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> PreparedData:
    rng = random.Random(2)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(150):
            f.write(json.dumps({"q": f"question {i}: " + _sentence(rng, 1, 20), "a": _sentence(rng, 1, 25)}) + "\n")
    return prepare(str(path), tmp_path_factory.mktemp("pairs-out") / "p", vocab_size=300, progress=False,
                   options=SourceOptions(prompt_field="q", response_field="a"))


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> PreparedData:
    rng = random.Random(3)
    programs = []
    for i in range(80):
        body = [f"    x{j} = {rng.randint(0, 99)} + x{j - 1}" for j in range(1, rng.randint(2, 7))]
        programs.append("\n".join([f"def f{i}(x0):", *body, "", "    return x0"]))
    path = tmp_path_factory.mktemp("code") / "code.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in programs), encoding="utf-8")
    return prepare(str(path), tmp_path_factory.mktemp("code-out") / "c", vocab_size=300, progress=False)


def examples(data: PreparedData, split: str) -> list[tuple[np.ndarray, int]]:
    """Each example's tokens (end-of-text included) and prompt length, straight from the shard."""
    tokens, offsets, prompts = data.tokens(split), data.offsets(split), data.prompt_lengths(split)
    return [(np.asarray(tokens[a:b]), int(p)) for a, b, p in zip(offsets[:-1], offsets[1:], prompts)]


def pieces(data: PreparedData, split: str, seq_len: int) -> Counter:
    """seq_len pieces of each example; an end-of-text that would be a piece of its own is dropped."""
    return Counter(tuple(t[i : i + seq_len].tolist()) for t, _ in examples(data, split)
                   for i in range(0, max(len(t) - 1, 1), seq_len))


def row_contents(rows: torch.Tensor, pad: int) -> Counter:
    return Counter(tuple(row[row != pad].tolist()) for row in rows)


def first_rows(stream, n: int) -> torch.Tensor:
    """The first n rows the stream yields."""
    rows = []
    while sum(map(len, rows)) < n:
        rows.append(next(stream).ids)
    return torch.cat(rows)[:n]


# --- packed -----------------------------------------------------------------------------------


def test_packed_windows_resume_and_ranks_take_interleaved_indices(docs):
    tokens = np.asarray(docs.train_tokens())
    stream = make_batches(docs, "train", "packed", seq_len=12, batch_size=6, seed=3)
    batch = next(stream)
    assert batch.cond_mask is None and batch.ids.shape == (6, 12) and batch.ids.dtype == torch.long
    for row in batch.ids.numpy():
        starts = np.flatnonzero(tokens[: len(tokens) - 11] == row[0])
        assert any(np.array_equal(tokens[s : s + 12], row) for s in starts)

    state = json.loads(json.dumps(stream.state_dict()))
    expected = [next(stream).ids for _ in range(3)]
    resumed = make_batches(docs, "train", "packed", 12, 6, seed=99)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, next(resumed).ids) for x in expected)

    single = make_batches(docs, "train", "packed", 12, 6, seed=3)
    for rank in range(2):
        ranked = make_batches(docs, "train", "packed", 12, 6, seed=3, rank=rank, world_size=2)
        for k in range(3):
            assert torch.equal(next(ranked).ids, single.batch(2 * k + rank, 6).ids)


def test_packed_validation_is_validation_windows(docs):
    batches = validation_batches(docs, "packed", seq_len=10, max_examples=7, batch_size=3)
    assert [b.ids.shape[0] for b in batches] == [3, 3, 1] and all(b.cond_mask is None for b in batches)
    assert torch.equal(torch.cat([b.ids for b in batches]), validation_windows(docs.val_tokens(), 10, 7))


# --- padded -----------------------------------------------------------------------------------


def test_padded_epoch_covers_every_piece_once_and_ranks_split_it(docs):
    pad = docs.tokenizer().pad_id
    want = pieces(docs, "train", 16)
    n = sum(want.values())
    stream = make_batches(docs, "train", "padded", seq_len=16, batch_size=7, seed=1)
    batch = next(stream)
    assert batch.cond_mask is None and batch.ids.shape == (7, 16)
    assert row_contents(first_rows(make_batches(docs, "train", "padded", 16, 7, seed=1), n), pad) == want

    # Three ranks draw interleaved indices of one order: together they read the epoch once.
    n_indices = -(-n // 5)
    by_index = {}
    for rank in range(3):
        mine = make_batches(docs, "train", "padded", 16, 5, seed=1, rank=rank, world_size=3)
        for index in range(rank, n_indices, 3):
            by_index[index] = next(mine).ids
    rows = torch.cat([by_index[i] for i in range(n_indices)])[:n]
    assert row_contents(rows, pad) == want


def test_padded_rows_end_in_end_of_text_then_pad(docs):
    tok = docs.tokenizer()
    for row in next(make_batches(docs, "train", "padded", 64, 32, seed=0)).ids:
        content = row[row != tok.pad_id]
        assert torch.equal(row[: len(content)], content)  # padding only at the end
        if len(content) < 64:
            assert content[-1] == tok.eot_id


def test_padded_window_mode_takes_random_windows_of_long_documents(docs):
    long_docs = [t for t, _ in examples(docs, "train") if len(t) > 16]
    assert long_docs
    stream = make_batches(docs, "train", "padded", 16, 64, seed=0, long_docs="window")
    for row in next(stream).ids.numpy():
        content = row[row != docs.tokenizer().pad_id]
        if len(content) == 16:
            assert any(
                any(np.array_equal(t[s : s + 16], content) for s in range(len(t) - 15)) for t in long_docs
            )


# --- pairs ------------------------------------------------------------------------------------


def expected_pair_row(tokens: np.ndarray, prompt: int, seq_len: int, limit: int, pad: int) -> tuple[list, int]:
    kept = min(prompt, limit)
    row = (tokens[:kept].tolist() + tokens[prompt:].tolist())[:seq_len]
    return row + [pad] * (seq_len - len(row)), kept


@pytest.mark.parametrize("seq_len, limit", [(64, None), (12, None), (12, 3)])
def test_pairs_clamp_the_prompt_and_pad_after_the_response(pairs, seq_len, limit):
    tok = pairs.tokenizer()
    options = {} if limit is None else {"max_prompt_len": limit}
    batches = validation_batches(pairs, "pairs", seq_len, max_examples=10_000, batch_size=16, **options)
    rows = [(ids, mask) for b in batches for ids, mask in zip(b.ids.tolist(), b.cond_mask.tolist())]
    want = examples(pairs, "val")
    assert len(rows) == len(want) == pairs.meta["n_val_documents"]
    for (ids, mask), (tokens, prompt) in zip(rows, want):
        assert tok.decode(tokens[:prompt].tolist()).startswith("question ")
        expected, kept = expected_pair_row(tokens, prompt, seq_len, seq_len // 2 if limit is None else limit, tok.pad_id)
        assert ids == expected
        assert mask == [True] * kept + [False] * (seq_len - kept)


def test_pairs_layout_needs_pairs_and_trains_on_them(pairs, docs):
    batch = next(make_batches(pairs, "train", "pairs", 32, 8, seed=0))
    assert batch.cond_mask.dtype == torch.bool and batch.cond_mask[:, 0].all() and not batch.cond_mask[:, -1].any()
    with pytest.raises(KLFlowError, match="no prompt/response pairs"):
        make_batches(docs, "train", "pairs", 32, 8)


# --- infill -----------------------------------------------------------------------------------


def test_infill_spans_mask_only_content_in_few_spans(pairs):
    tok = pairs.tokenizer()
    stream = make_batches(pairs, "train", "infill", 48, 32, seed=0, mask_fraction=0.5, max_spans=2)
    for _ in range(3):
        batch = next(stream)
        assert (~batch.cond_mask).any(dim=1).float().mean() > 0.9  # rows that are all prompt mask nothing
        for ids, given in zip(batch.ids, batch.cond_mask):
            masked = ~given
            content = (ids != tok.pad_id) & (ids != tok.eot_id)
            assert not (masked & ~content).any()  # end-of-text and pad stay given
            edges = torch.diff(masked.long(), prepend=torch.zeros(1, dtype=torch.long))
            assert int((edges == 1).sum()) <= 2


def test_infill_never_masks_a_prompt_and_masks_the_asked_fraction(pairs):
    want = examples(pairs, "val")
    assert max(len(tokens) for tokens, _ in want) <= 128  # one row per example
    batches = validation_batches(pairs, "infill", 128, 10_000, 16, mask_fraction=0.5)
    rows = [(ids, given) for b in batches for ids, given in zip(b.ids, b.cond_mask)]
    assert len(rows) == len(want)
    for (ids, given), (tokens, prompt) in zip(rows, want):
        assert given[:prompt].all()
        n_response = len(tokens) - 1 - prompt  # the end-of-text is not content
        assert int((~given).sum()) == max(1, round(0.5 * n_response))


def test_infill_lines_masks_whole_non_empty_lines(code):
    tok = code.tokenizer()
    newline = torch.tensor(["\n" in t for t in tok.token_texts()])
    batches = validation_batches(code, "infill", 96, 10_000, 16, unit="lines", mask_fraction=(0.2, 0.6))
    again = validation_batches(code, "infill", 96, 10_000, 16, unit="lines", mask_fraction=(0.2, 0.6))
    assert all(torch.equal(a.cond_mask, b.cond_mask) for a, b in zip(batches, again))
    n_masked_rows = 0
    for batch in batches:
        for ids, given in zip(batch.ids, batch.cond_mask):
            line = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(newline[ids[:-1]].long(), 0)])
            content = (ids != tok.pad_id) & (ids != tok.eot_id)
            for number in line[~given].unique():
                assert (~given[(line == number) & content]).all()  # a masked line is masked whole
                assert tok.decode(ids[(line == number) & content].tolist()).strip()  # and is not blank
            n_masked_rows += bool((~given).any())
    assert n_masked_rows == sum(len(b.ids) for b in batches)

    everything = validation_batches(code, "infill", 96, 10_000, 16, unit="lines", mask_fraction=1.0)[0]
    for ids, given in zip(everything.ids, everything.cond_mask):
        shown = tok.decode(ids[given & (ids != tok.pad_id) & (ids != tok.eot_id)].tolist())
        assert not shown.strip()


def test_infill_line_slots_pad_each_masked_line_with_end_of_text(code):
    tok = code.tokenizer()
    newline = np.array(["\n" in t for t in tok.token_texts()])
    plain = make_batches(code, "train", "infill", 96, 16, seed=5, unit="lines").batch(0, 16)
    slotted = make_batches(code, "train", "infill", 96, 16, seed=5, unit="lines", line_slot=12).batch(0, 16)
    n_slots = 0
    for ids, given, original in zip(slotted.ids.numpy(), slotted.cond_mask.numpy(), plain.ids.numpy()):
        # Without its filler the row is the same example's row, cut where the slots pushed it past seq_len.
        content = ids[~((ids == tok.eot_id) & ~given) & (ids != tok.pad_id)]
        assert np.array_equal(content, original[original != tok.pad_id][: len(content)])
        masked = np.flatnonzero(~given)
        for run in np.split(masked, np.flatnonzero(np.diff(masked) > 1) + 1):
            if run[-1] < len(ids) - 1:  # only a slot cut by the end of the row is shorter
                assert len(run) % 12 == 0
            for first in range(0, len(run), 12):
                tokens = ids[run[first : first + 12]]
                # One line per slot: its tokens up to a newline (or the filler), then filler only.
                line_end = np.flatnonzero(newline[tokens])
                content_len = line_end[0] + 1 if len(line_end) else int(np.argmax(tokens == tok.eot_id))
                assert content_len >= 1 and (tokens[content_len:] == tok.eot_id).all()
                n_slots += 1
    assert n_slots > 30
    with pytest.raises(KLFlowError, match="line_slot applies to whole-line masks only"):
        validation_batches(code, "infill", 96, 4, 4, line_slot=12)
    with pytest.raises(KLFlowError, match="line_slot must be a positive integer"):
        validation_batches(code, "infill", 96, 4, 4, unit="lines", line_slot=0)


# --- streams ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["padded", "pairs", "infill"])
def test_document_streams_resume_exactly_from_any_rank_state(pairs, layout):
    def stream(seed: int, rank: int):
        return make_batches(pairs, "train", layout, 24, 5, seed=seed, rank=rank, world_size=2)

    rank0, rank1 = stream(4, 0), stream(4, 1)
    for _ in range(40):  # past the end of the first epoch
        next(rank0), next(rank1)
    state = json.loads(json.dumps(rank0.state_dict()))
    assert state == rank1.state_dict()
    resumed = stream(0, 1)
    resumed.load_state_dict(state)
    for _ in range(3):
        a, b = next(rank1), next(resumed)
        assert torch.equal(a.ids, b.ids)
        assert (a.cond_mask is None and b.cond_mask is None) or torch.equal(a.cond_mask, b.cond_mask)


def test_stream_state_must_fit(pairs):
    stream = make_batches(pairs, "train", "padded", 24, 5)
    state = stream.state_dict()
    for other in (make_batches(pairs, "train", "infill", 24, 5), make_batches(pairs, "train", "padded", 24, 6),
                  make_batches(pairs, "train", "padded", 24, 5, long_docs="window")):
        with pytest.raises(KLFlowError, match="does not fit"):
            other.load_state_dict(state)
    with pytest.raises(KLFlowError, match="does not fit"):
        stream.load_state_dict({"bit_generator": "nonsense"})


def test_layout_argument_errors(pairs):
    assert LAYOUTS == ("packed", "padded", "pairs", "infill")
    cases = [
        (dict(layout="stacked"), "layout must be one of"),
        (dict(layout="packed", long_docs="split"), "has no option long_docs"),
        (dict(layout="padded", long_docs="sometimes"), "long_docs must be"),
        (dict(layout="infill", unit="words"), "unit must be"),
        (dict(layout="infill", mask_fraction=(0.7, 0.2)), "mask_fraction must be"),
        (dict(layout="infill", mask_fraction="most"), "mask_fraction must be"),
        (dict(layout="infill", max_spans=0), "max_spans must be"),
        (dict(layout="pairs", max_prompt_len=24), "max_prompt_len must be"),
        (dict(layout="padded", seq_len=0), "must be positive"),
        (dict(layout="padded", rank=2, world_size=2), "rank must lie"),
        (dict(layout="padded", seed=-1), "seed must be"),
        (dict(layout="padded", split="test"), "split must be one of"),
        (dict(layout="packed", seq_len=10**7), "need at least seq_len"),
    ]
    for kwargs, message in cases:
        args = {"split": "train", "seq_len": 24, "batch_size": 4, **kwargs}
        with pytest.raises(KLFlowError, match=message):
            make_batches(pairs, args.pop("split"), args.pop("layout"), args.pop("seq_len"), args.pop("batch_size"),
                         **args)
    with pytest.raises(KLFlowError, match="max_examples must be positive"):
        validation_batches(pairs, "padded", 24, 0, 4)
    with pytest.raises(KLFlowError, match="batch index must be >= 0"):
        make_batches(pairs, "train", "padded", 24, 4).batch(-1, 4)


def test_special_ids_are_looked_up_not_assumed(tmp_path, docs):
    """A tokenizer whose end-of-text/pad/mask are not 0/1/2 (as in GPT-2) drives every layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"Ġt": len(vocab), "he": len(vocab) + 1, "<|endoftext|>": len(vocab) + 2})
    (tmp_path / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nĠ t\nh e\n", encoding="utf-8")
    tok = TextTokenizer.gpt2(tmp_path)
    assert (tok.eot_id, tok.pad_id, tok.mask_id, tok.vocab_size) == (258, 259, 260, 261)
    assert tok.decode(tok.encode("the <|pad|> café")) == "the <|pad|> café"
    tok.save(tmp_path / "tokenizer.json")
    assert isinstance(Tokenizer.from_file(str(tmp_path / "tokenizer.json")).model, models.BPE)

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"doc {i} " + "the cat " * (i % 9) for i in range(40)), encoding="utf-8")
    data = prepare(str(corpus), tmp_path / "out", progress=False, tokenizer=str(tmp_path / "tokenizer.json"))
    assert data.meta["special_ids"] == {"eot": 258, "pad": 259, "mask": 260} and data.meta["tokenizer"] == "file"
    assert data.train_tokens()[-1] == 258
    row = next(make_batches(data, "train", "padded", 64, 1)).ids[0]
    assert row[-1] == 259 and 258 in row.tolist() and 0 not in row.tolist()
    masked = validation_batches(data, "infill", 64, 4, 4)[0]
    assert masked.cond_mask[masked.ids == 258].all() and masked.cond_mask[masked.ids == 259].all()
