"""torchrun with 2 CPU processes (gloo): ranks stay identical and match one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES
from klflow.config import load_config
from klflow.errors import KLFlowError
from klflow.train import micro_batching, train

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_micro_batching_splits_the_global_batch():
    assert micro_batching(8, None, 2) == (4, 1)
    assert micro_batching(8, 2, 2) == (2, 2)
    assert micro_batching(8, 4, 1) == (4, 2)
    with pytest.raises(KLFlowError, match="multiple of micro_batch_size"):
        micro_batching(8, 3, 2)


def test_two_processes_match_one_process_with_accumulation(tiny_corpus, tmp_path):
    overrides = [f"data.source={json.dumps(str(tiny_corpus))}", *TINY_OVERRIDES, "train.max_steps=4",
                 "train.eval_interval=4", "train.batch_size=8"]
    single = train(load_config("quickstart", overrides + ["train.micro_batch_size=4"]), tmp_path / "single",
                   progress=False, log=lambda _: None)  # 1 process x 2 accumulated micro-batches of 4
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "klflow",
            "train", "--data", str(tiny_corpus), "--out", str(tmp_path / "ddp"), "--no-progress"]
    for item in overrides[1:]:
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "batch 8 = 2 process(es) x 1 x 4" in run.stdout
    assert "parameters identical across 2 processes: True" in run.stdout
    a = load_file(str(single.checkpoint / "model.safetensors"))
    b = load_file(str(next((tmp_path / "ddp").glob("step-*")) / "model.safetensors"))
    # same windows and noise; only the order of floating-point sums differs
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    log_single = json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[-1])
    log_ddp = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])
    assert log_ddp["train_loss"] == pytest.approx(log_single["train_loss"], abs=1e-4)
    assert log_ddp["val_loss"] == pytest.approx(log_single["val_loss"], abs=1e-4)
    assert log_ddp["tokens"] == log_single["tokens"] == 4 * 8 * 16

    # resume the 2-process run in one process (accumulating 2 x 4): it continues the same stream
    more = overrides + ["train.micro_batch_size=4", "train.max_steps=6"]
    ddp_then_single = train(load_config("quickstart", more), tmp_path / "ddp", resume=True, progress=False,
                            log=lambda _: None)
    single_more = train(load_config("quickstart", more), tmp_path / "single", resume=True, progress=False,
                        log=lambda _: None)
    c = load_file(str(ddp_then_single.checkpoint / "model.safetensors"))
    d = load_file(str(single_more.checkpoint / "model.safetensors"))
    assert ddp_then_single.steps == 6
    assert all(torch.allclose(c[k], d[k], atol=1e-5, rtol=1e-4) for k in c)
