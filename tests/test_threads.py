"""The CLI's thread rule: the cores no other runnable process holds, unless OMP_NUM_THREADS chose."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from klflow import threads


def test_free_cores_subtracts_the_other_runnable_processes(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    for others, expected in ((0, 8), (3, 5), (7, 1), (20, 1), (None, 8)):
        monkeypatch.setattr(threads, "runnable_others", lambda others=others: others)
        assert threads.free_cores() == expected


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux's /proc/stat")
def test_a_busy_process_is_counted_as_runnable():
    before = threads.runnable_others()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        seen = max(threads.runnable_others() for _ in range(20))
    finally:
        busy.kill()
        busy.wait()
    assert before is not None and seen >= 1


def test_use_free_cores_sets_torch_threads_unless_omp_num_threads_is_set(monkeypatch):
    original = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads, "free_cores", lambda: 1)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(2)
        assert threads.use_free_cores() is None and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert threads.use_free_cores() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(original)
