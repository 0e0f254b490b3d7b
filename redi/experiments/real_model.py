"""The table of the real-model example (scripts/real_model_example.sh, docs/real-model-example.md).

``python -m redi.experiments.real_model RUN`` reads ``RUN/eval/ARM/DECODING/samples.jsonl`` (graded by
`redi eval`) for the four arms (base, SFT, REDI, continued SFT) and two decodings (greedy, T = 0.6), and
writes ``RUN/table.md`` and ``RUN/table.json``.

Two standard errors, because they answer different questions:

- ``sem``: over problems, ``std(a_i, ddof=1) / sqrt(N)`` where ``a_i`` is problem i's accuracy over its
  samples. It covers which problems were drawn, so it is the one to hold two arms' difference against; with
  one greedy sample per problem it is the binomial ``sqrt(p(1-p)/(N-1))``.
- ``paper_sem``: the paper's, over sample indices (redi.evaluation.scores.sem_paper): the spread of the
  per-index accuracies of the same problems, i.e. sampling noise only. None for greedy (one sample).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from redi.errors import UserError
from redi.evaluation.scores import pass_at_1, sem_paper

ARMS = ("base", "sft", "redi", "continued-sft")
ARM_TITLES = {"base": "base (SmolLM2-135M-Instruct)", "sft": "SFT (stage 1)", "redi": "REDI (stage 2)",
              "continued-sft": "continued SFT (control)"}
DECODINGS = ("greedy", "t0.6")


def sem_over_problems(scores: list[list[bool]]) -> float | None:
    """Standard error of the mean per-problem accuracy; None with fewer than two problems."""
    if len(scores) < 2:
        return None
    per_problem = [sum(map(bool, row)) / len(row) for row in scores]
    mean = sum(per_problem) / len(per_problem)
    variance = sum((a - mean) ** 2 for a in per_problem) / (len(per_problem) - 1)
    return math.sqrt(variance / len(per_problem))


def read_scores(samples_path: Path) -> list[list[bool]]:
    """Graded samples.jsonl -> one list of verdicts per problem, in sample order."""
    if not samples_path.is_file():
        raise UserError(f"{samples_path}: missing; run the example's evaluation first")
    by_problem: dict[str, list[tuple[int, bool]]] = {}
    for line_no, line in enumerate(samples_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "correct" not in row:
            raise UserError(f"{samples_path}:{line_no}: not graded (no 'correct'); rerun its redi eval")
        by_problem.setdefault(str(row["id"]), []).append((int(row["sample"]), bool(row["correct"])))
    return [[correct for _, correct in sorted(rows)] for rows in by_problem.values()]


def cell(scores: list[list[bool]]) -> dict:
    return {"accuracy": pass_at_1(scores), "sem": sem_over_problems(scores), "paper_sem": sem_paper(scores),
            "problems": len(scores), "samples_per_problem": min(len(row) for row in scores)}


def build_table(run: Path) -> dict:
    """{arm: {decoding: cell}} for every arm and decoding of the run."""
    return {arm: {d: cell(read_scores(run / "eval" / arm / d / "samples.jsonl")) for d in DECODINGS} for arm in ARMS}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(table: dict) -> str:
    first = table[ARMS[0]]
    head = (f"| arm | greedy (n=1) | T=0.6 (n={first['t0.6']['samples_per_problem']}) | T=0.6 paper SEM |\n"
            "|---|---|---|---|\n")
    rows = []
    for arm in ARMS:
        g, t = table[arm]["greedy"], table[arm]["t0.6"]
        rows.append(f"| {ARM_TITLES[arm]} | {_pct(g['accuracy'])} ± {_pct(g['sem'])} | "
                    f"{_pct(t['accuracy'])} ± {_pct(t['sem'])} | {_pct(t['paper_sem'])} |")
    note = (f"\nAccuracy in % on {first['greedy']['problems']} held-out problems, ± SEM over problems; "
            "the last column is the paper's SEM over sample indices (sampling noise only).\n")
    return head + "\n".join(rows) + "\n" + note


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m redi.experiments.real_model RUN_DIR", file=sys.stderr)
        return 2
    run = Path(args[0])
    try:
        table = build_table(run)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = markdown(table)
    (run / "table.json").write_text(json.dumps(table, indent=2))
    (run / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
