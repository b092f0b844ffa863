"""Sequence-level distillation: a teacher's samples written as a prepared folder a student trains on."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_ARGS
from klflow.cli import main
from klflow.data import PreparedData
from klflow.data.shards import write_derived
from klflow.distill import batch_seed, distill, split_documents
from klflow.errors import KLFlowError
from klflow.trained import TrainedModel


@pytest.fixture(scope="module")
def ar_teacher(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["train", "--data", str(tiny_corpus), "--out", str(out), "--method", "ar", "--train-steps", "3",
                 "--no-progress", *TINY_ARGS]) == 0
    return out


def test_split_documents_cuts_after_each_end_of_text_and_closes_the_last_piece():
    eot = 0
    ids = torch.tensor([[5, 6, eot, 7], [eot, eot, 8, 9], [3, 4, 5, eot]])
    assert split_documents(ids, eot) == [[5, 6, eot], [7, eot], [8, 9, eot], [3, 4, 5, eot]]


def test_batch_seeds_are_distinct():
    seeds = {batch_seed(seed, batch) for seed in range(4) for batch in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)


def test_distilled_folder_holds_the_teachers_sequences_and_the_real_validation(ar_teacher, tmp_path):
    teacher = TrainedModel(ar_teacher, "cpu")
    done = []
    data = distill(teacher, tmp_path / "distilled", 10, batch_size=4, seed=3, temperature=0.8, progress=done.append)
    assert done == [4, 8, 10]
    like = PreparedData.load(teacher.checkpoint.config["data_dir"])
    for name in ("val.bin", "val.idx.npy", "val.prompt.npy", "tokenizer.json"):
        assert (data.dir / name).read_bytes() == (like.dir / name).read_bytes()
    # The train split is the teacher's batches, drawn with their seeds, cut at end-of-text.
    sampler = teacher.sampler(64, 3, temperature=0.8)
    eot = teacher.tokenizer.eot_id
    rows = torch.cat([sampler.generate(n, 64, batch_seed(3, b)) for b, n in enumerate([4, 4, 2])])
    expected = np.concatenate([np.array(d) for d in split_documents(rows, eot)])
    assert np.array_equal(np.asarray(data.train_tokens()), expected)
    offsets = data.offsets("train")
    assert len(offsets) - 1 == data.meta["n_train_documents"] and offsets[-1] == data.meta["n_train_tokens"]
    record = data.meta["derived_from"]
    assert record["num_samples"] == 10 and record["sampler"]["temperature"] == 0.8 and record["teacher_step"] == 3
    assert record["nfe_per_sequence"] == 16  # ar: one call per token of the 16-token window


def test_distillation_is_a_function_of_its_seed(ar_teacher, tmp_path):
    teacher = TrainedModel(ar_teacher, "cpu")
    a = distill(teacher, tmp_path / "a", 6, batch_size=3, seed=0)
    b = distill(teacher, tmp_path / "b", 6, batch_size=3, seed=0)
    c = distill(teacher, tmp_path / "c", 6, batch_size=3, seed=1)
    assert (a.dir / "train.bin").read_bytes() == (b.dir / "train.bin").read_bytes()
    assert (a.dir / "train.bin").read_bytes() != (c.dir / "train.bin").read_bytes()


def test_klflow_distill_then_train_a_student_on_it(ar_teacher, tmp_path, capsys):
    out = tmp_path / "distilled"
    assert main(["distill", str(ar_teacher), "--out", str(out), "-n", "24", "--batch-size", "8", "--temperature",
                 "0.8", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "distilled 24 sequences of ar" in said and f"klflow train --data {out}" in said
    student = tmp_path / "student"
    assert main(["train", "--data", str(out), "--out", str(student), "--train-steps", "2", "--no-progress",
                 *TINY_ARGS]) == 0
    config = json.loads(next(student.glob("step-*/config.json")).read_text())
    assert Path(config["data_dir"]) == out.resolve()


def test_distill_errors_name_the_flag(ar_teacher, tmp_path, capsys):
    assert main(["distill", str(ar_teacher), "--out", str(tmp_path / "x"), "-n", "0", "--no-progress"]) == 2
    assert "-n" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["distill", str(ar_teacher), "--out", str(foreign), "-n", "2", "--no-progress"]) == 2
    assert "not a klflow data folder" in capsys.readouterr().err
    assert main(["distill", str(ar_teacher), "--out", str(tmp_path / "y"), "-n", "2", "--data", str(tmp_path),
                 "--no-progress"]) == 2
    assert "--data" in capsys.readouterr().err


def test_write_derived_refuses_a_document_without_its_end(ar_teacher, tmp_path):
    like = PreparedData.load(TrainedModel(ar_teacher, "cpu").checkpoint.config["data_dir"])
    eot = like.meta["special_ids"]["eot"]
    with pytest.raises(KLFlowError, match="end-of-text"):
        write_derived(tmp_path / "bad", like, [[5, 6]], {"source": "test"})
    with pytest.raises(KLFlowError, match="end-of-text"):
        write_derived(tmp_path / "bad", like, [[5, eot, 6, eot]], {"source": "test"})
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
