"""pass@k and compiled@k for generated programs, each run by `run_sandboxed`.

For a problem with n generated programs of which c pass its tests, the unbiased estimator of
the probability that at least one of k programs drawn without replacement passes is
(Chen et al. 2021)

    pass@k = 1 - C(n - c, k) / C(n, k)     (= 1 when n - c < k),

averaged over problems. compiled@k is the same estimator with c = the number of programs that
compile. A timeout, a crash, a memory error or a blocked network call is a failure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from klflow.errors import KLFlowError
from klflow.evaluation.sandbox import SandboxLimits, SandboxResult, run_sandboxed


@dataclass(frozen=True)
class CodeProblem:
    programs: Sequence[str]  # the n generated programs
    tests: str  # code that raises (e.g. assert) unless a program is correct


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k of the n programs is correct), c of n correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise KLFlowError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class CodeMetrics:
    scores: dict[str, float]  # "pass@k" and "compiled@k" for each k
    results: list[list[SandboxResult]]  # per problem, per program


def code_metrics(
    problems: Sequence[CodeProblem],
    ks: Sequence[int] = (1,),
    limits: SandboxLimits = SandboxLimits(),
    workers: int | None = None,
) -> CodeMetrics:
    """pass@k and compiled@k for each k, with every program's sandbox result."""
    if not problems:
        raise KLFlowError("code evaluation needs at least one problem")
    smallest = min(len(problem.programs) for problem in problems)
    if any(not 1 <= k <= smallest for k in ks):
        raise KLFlowError(f"every k must lie in [1, {smallest}], the fewest programs of any problem; got {list(ks)}")
    jobs = [(problem, program) for problem in problems for program in problem.programs]
    # Threads only wait on child processes, so one per core keeps the cores busy.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        flat = iter(list(pool.map(lambda job: run_sandboxed(job[1], job[0].tests, limits), jobs)))
    results = [[next(flat) for _ in problem.programs] for problem in problems]
    scores: dict[str, float] = {}
    for k in ks:
        for name, field in (("pass", "passed"), ("compiled", "compiled")):
            estimates = [pass_at_k(len(rs), sum(getattr(r, field) for r in rs), k) for rs in results]
            scores[f"{name}@{k}"] = float(np.mean(estimates))
    return CodeMetrics(scores, results)
