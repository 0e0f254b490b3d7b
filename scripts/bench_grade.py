"""Grading speed of redi.evaluation.grading.grade_many on 10,000 synthetic responses, for 1 and 2 worker processes.

    python scripts/bench_grade.py [--responses 10000] [--workers 1 2] [--seed 0]

The mix imitates an evaluation run: 16 samples per problem, golds of several kinds (integers stored as AMC-style
floats, fractions, radicals, intervals, tuples, list golds), answers right in canonical and in other forms,
wrong, and format errors (no box, unclosed <think>), after a few KB of thinking text. Each setting runs in a
fresh process so no math-verify cache carries over from the previous one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

SAMPLES_PER_PROBLEM = 16
FILLER = "Let me think about this step by step. We try a substitution and check the boundary cases. " * 40


def _gold_and_variants(rng: random.Random):
    """(gold as a dataset stores it, correct answers in several notations, a wrong answer)."""
    kind = rng.randrange(6)
    a, b = rng.randint(1, 99), rng.randint(2, 30)
    if kind == 0:
        return float(a * 7), [str(a * 7), f"{a * 7}.0", f"{a * 7}"], str(a * 7 + rng.randint(1, 9))
    if kind == 1:
        num = a if a % b else a + 1
        return f"\\frac{{{num}}}{{{b}}}", [f"\\frac{{{num}}}{{{b}}}", f"\\dfrac{{{num}}}{{{b}}}", f"{num}/{b}"], \
            f"\\frac{{{num + 1}}}{{{b}}}"
    if kind == 2:
        return f"{a}\\sqrt{{{b}}}", [f"{a}\\sqrt{{{b}}}", f"{a} \\cdot \\sqrt{{{b}}}", f"\\sqrt{{{b}}} \\cdot {a}"], \
            f"{a + 1}\\sqrt{{{b}}}"
    if kind == 3:
        return f"[{-a}, {b})", [f"[{-a},{b})", f"[{-a}, {b})", f"\\left[{-a}, {b}\\right)"], f"({-a}, {b}]"
    if kind == 4:
        return [f"({a}, {b})"], [f"({a},{b})", f"({a}, {b})", f"\\left({a}, {b}\\right)"], f"({b}, {a})"
    return [f"{a}", f"{a}\\%"], [str(a), f"{a}\\%", f"{a}.00"], str(a + b)


def synthetic_batch(total: int, seed: int) -> tuple[list[str], list]:
    rng = random.Random(seed)
    responses, answers = [], []
    while len(responses) < total:
        gold, right, wrong = _gold_and_variants(rng)
        for _ in range(SAMPLES_PER_PROBLEM):
            roll = rng.random()
            thinking = f"<think>\n{FILLER[: rng.randint(500, len(FILLER))]}\\boxed{{{wrong}}} maybe\n"
            if roll < 0.05:
                response = thinking  # truncated inside the thinking block
            elif roll < 0.10:
                response = thinking + "</think>\nThe answer is " + rng.choice(right) + "."
            elif roll < 0.60:
                response = thinking + f"</think>\nTherefore, the final answer is: $\\boxed{{{rng.choice(right)}}}$."
            else:
                noise = rng.randint(0, 10_000)  # wrong answers rarely repeat, as in real failed samples
                response = thinking + f"</think>\nSo the answer is $\\boxed{{{wrong} + {noise}}}$."
            responses.append(response)
            answers.append(gold)
    return responses[:total], answers[:total]


def measure(total: int, workers: int, seed: int) -> dict:
    from redi.evaluation.grading import grade_many

    responses, answers = synthetic_batch(total, seed)
    cpu_before, start = os.times(), time.perf_counter()
    verdicts = grade_many(responses, answers, workers=workers)
    seconds, cpu_after = time.perf_counter() - start, os.times()
    # CPU seconds of this process only (workers are forkserver children, not ours): with 1 worker it is the
    # whole cost, free of wall-clock noise when the machine is shared; with more it is the dispatch overhead.
    cpu = sum(cpu_after[:2]) - sum(cpu_before[:2])
    graded = {(v.extracted, json.dumps(a)) for a, v in zip(answers, verdicts) if not v.format_error}
    return {"workers": workers, "seconds": seconds, "cpu_seconds": cpu, "load": os.getloadavg()[0], "responses_per_s": total / seconds,
            "correct": sum(v.correct for v in verdicts), "format_errors": sum(v.format_error for v in verdicts),
            "timeouts": sum(v.timed_out for v in verdicts), "distinct_judgements": len(graded)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one setting, print JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.responses, args.one, args.seed)))
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"grade_many on {args.responses:,} synthetic responses")
    for column in ("workers", "wall s", "resp/s", "CPU s here", "load", "correct", "fmt err", "timeouts",
                   "distinct"):
        table.add_column(column, justify="right", no_wrap=True)
    for workers in args.workers:
        out = subprocess.run([sys.executable, __file__, "--one", str(workers), "--responses", str(args.responses),
                              "--seed", str(args.seed)], check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        table.add_row(str(workers), f"{row['seconds']:.2f}", f"{row['responses_per_s']:,.0f}",
                      f"{row['cpu_seconds']:.1f}", f"{row['load']:.1f}", str(row["correct"]),
                      str(row["format_errors"]), str(row["timeouts"]), str(row["distinct_judgements"]))
    Console(width=120).print(table)
    print(f"{os.cpu_count()} cores. distinct: (extracted answer, gold) pairs actually judged, identical ones "
          "once. load: 1-min load average at the end (other work on the machine slows the wall clock).")


if __name__ == "__main__":
    main()
