"""Both graders on the same 20 cases; prints a Markdown table and the cases where they disagree.

    python scripts/compare_graders.py            # the table docs/evaluation.md shows

rllm is the paper's grader (redi.evaluation.rllm_grader); math-verify is redi's default outside the paper's
template. Both see the same responses, with ``</think>`` required (the paper forced ``<think>``).
"""
from __future__ import annotations

# (prediction inside \boxed{}, gold). Chosen where answer formats differ: fractions, integers, units, sets,
# intervals, text; the first five are plain agreements.
CASES = [
    ("5", "5"),
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("142", 142.0),
    ("7", "8"),
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{6}{2}", "3"),
    ("\\frac{2}{4}", "\\frac{1}{2}"),
    ("2.00000001", "2"),
    ("1024", "2^{10}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("x = 5", "5"),
    ("10^\\circ", "10"),
    ("5 \\text{ cm}", "5"),
    ("3 million", "3000000"),
    ("(1, 2)", "[1, 2)"),
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("evelyn", "\\text{Evelyn}"),
    ("7 3/4", "\\frac{31}{4}"),
    ("1,000", "1000"),
]


def verdicts() -> list[tuple[str, str, bool, bool]]:
    from redi.evaluation.grading import grade_many

    responses = [f"<think>\nwork</think>\nThe answer is $\\boxed{{{pred}}}$." for pred, _ in CASES]
    golds = [gold for _, gold in CASES]
    rllm = grade_many(responses, golds, grader="rllm", workers=1)
    math_verify = grade_many(responses, golds, grader="math-verify", require_think=True, workers=1)
    return [(pred, str(gold), r.correct, m.correct) for (pred, gold), r, m in zip(CASES, rllm, math_verify)]


def markdown(rows) -> str:
    mark = {True: "correct", False: "wrong"}
    lines = ["| prediction | gold | rllm (paper) | math-verify |", "|---|---|---|---|"]
    for pred, gold, r, m in rows:
        flag = " **≠**" if r != m else ""
        lines.append(f"| `{pred}` | `{gold}` | {mark[r]} | {mark[m]}{flag} |")
    differ = sum(r != m for *_, r, m in rows)
    lines.append("")
    lines.append(f"{differ} of {len(rows)} cases differ.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(verdicts()))
