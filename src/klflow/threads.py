"""How many CPU threads PyTorch uses: the cores that are free when a command starts.

PyTorch starts one OpenMP thread per core. When another CPU-bound process shares the cores, those
threads wait for each other in a spin and a step takes several times longer than with fewer
threads; on an idle machine all cores are best. So a command takes the cores that no other
runnable process holds when it starts, unless the user chose (OMP_NUM_THREADS). The measurement
behind the rule is `benchmarks/shared_cores.py`, its figures in docs/performance.md.
"""

from __future__ import annotations

import os


def runnable_others() -> int | None:
    """Runnable processes on the machine besides this one (Linux: /proc/stat's procs_running - 1), else None."""
    try:
        with open("/proc/stat") as handle:
            for line in handle:
                if line.startswith("procs_running"):
                    return max(0, int(line.split()[1]) - 1)
    except OSError:
        return None
    return None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def free_cores() -> int:
    """usable_cores() less the other runnable processes, at least 1."""
    others = runnable_others()
    return max(1, usable_cores() - (others or 0))


def use_free_cores() -> int | None:
    """torch.set_num_threads(free_cores()) unless OMP_NUM_THREADS is set; the threads chosen, or None."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    threads = free_cores()
    torch.set_num_threads(threads)
    return threads
