"""The paper's metrics over graded samples (spec §5.3): pass@1, unbiased pass@k, and its SEM over sample
indices. ``scores[i][j]`` is sample j of problem i, truthy when correct."""
from __future__ import annotations

import math
from collections.abc import Sequence

# ``scores`` is one list per problem of 0/1 (or bool) per sample, in sample-index order. Problems may have
# unequal sample counts (an interrupted eval): pass@1 then averages per-problem accuracies, so every problem
# weighs the same, and n (for pass@n and the SEM) is the smallest count, so every index covers every problem.
# With equal counts all of this is exactly the paper's definition (spec §5.3).


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """Chen et al. 2021: 1 - C(n-c, k) / C(n, k), the chance that k of n samples include a correct one."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"need 0 < k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _samples_per_problem(scores: Sequence[Sequence]) -> int:
    if not scores or min(len(row) for row in scores) == 0:
        raise ValueError("need at least one problem and one sample per problem")
    return min(len(row) for row in scores)


def pass_at_1(scores: Sequence[Sequence]) -> float:
    """Mean accuracy over all samples (per problem first, which is the same when counts are equal)."""
    _samples_per_problem(scores)
    return sum(sum(map(bool, row)) / len(row) for row in scores) / len(scores)


def pass_at_k(scores: Sequence[Sequence], k: int) -> float:
    """Mean over problems of the unbiased estimator; at k = n it is the fraction with any correct sample."""
    _samples_per_problem(scores)
    return sum(pass_at_k_unbiased(len(row), sum(map(bool, row)), k) for row in scores) / len(scores)


def per_index_accuracies(scores: Sequence[Sequence]) -> list[float]:
    """Benchmark accuracy of sample index j alone, for j < n: the n "runs" whose spread gives the SEM."""
    n = _samples_per_problem(scores)
    return [sum(bool(row[j]) for row in scores) / len(scores) for j in range(n)]


def sem_paper(scores: Sequence[Sequence]) -> float | None:
    """The paper's SEM: population std (ddof=0) of the per-index accuracies over sqrt(n); None when n < 2."""
    accuracies = per_index_accuracies(scores)
    n = len(accuracies)
    if n < 2:
        return None
    mean = sum(accuracies) / n
    return math.sqrt(sum((a - mean) ** 2 for a in accuracies) / n) / math.sqrt(n)


def reported_ks(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n: the pass@k columns worth showing."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarize(scores: Sequence[Sequence], *, format_errors: int = 0, timeouts: int = 0) -> dict:
    """Every metric of one benchmark as a JSON-ready dict (accuracies as fractions, not percent)."""
    n = _samples_per_problem(scores)
    summary: dict = {
        "problems": len(scores),
        "samples": sum(len(row) for row in scores),
        "n": n,
        "samples_per_problem": {"min": n, "max": max(len(row) for row in scores)},
    }
    for k in reported_ks(n):
        summary[f"pass@{k}"] = pass_at_1(scores) if k == 1 else pass_at_k(scores, k)
    summary["sem"] = sem_paper(scores)
    summary["format_errors"] = format_errors
    summary["timeouts"] = timeouts
    return summary
