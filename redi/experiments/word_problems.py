"""Arithmetic word problems for the real-model example (docs/real-model-example.md), from a seed.

``python -m redi.experiments.word_problems --output DIR --train N --eval M --seed S`` writes
``DIR/train.jsonl`` and ``DIR/eval.jsonl`` (id, problem, answer), the files `redi data generate --problems`
and `redi eval --benchmark` read. Train and eval never share a problem.

Each problem carries its own instruction ("Answer briefly."), so the same text is the whole user turn for
`redi data generate --instruction '{problem}'`, for training (the pairs' prompt is the problem) and for
`redi eval --template raw`: the model sees one prompt everywhere. SmolLM2-135M-Instruct never writes
``\\boxed{}`` (asked for one, it writes an empty box or a literal ``\\boxed{N}``), so the example grades
with ``--grader math-verify-unboxed``: the last number of the answer. Asked to be brief, it answers in one
or two sentences (greedy: 6 of 24 right on numbers 1-10, mostly short), which keeps generation cheap.

The task is one addition or subtraction of two numbers in a short story. SmolLM2-135M-Instruct answers some
of them (it often writes a wrong sum), which is what self-distillation needs: problems with correct and wrong
samples both.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from redi.errors import UserError

NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Leo", "Emma", "Max", "Zoe")
THINGS = ("apples", "marbles", "books", "stickers", "coins", "pencils", "cookies", "cards")
INSTRUCTION = " Answer briefly."

# (story with {who} {a} {b} {what}, operation): the operation gives the answer from a and b.
TEMPLATES = (
    ("{who} has {a} {what}. {who} gets {b} more {what}. How many {what} does {who} have now?", "+"),
    ("{who} had {a} {what} and found {b} more. How many {what} does {who} have in total?", "+"),
    ("There are {a} {what} in a box and {b} {what} on the table. How many {what} are there altogether?", "+"),
    ("{who} has {a} {what}. {who} gives away {b} {what}. How many {what} does {who} have left?", "-"),
    ("{who} had {a} {what} and lost {b} of them. How many {what} are left?", "-"),
)


def make_problem(rng: np.random.Generator, low: int, high: int) -> tuple[str, int]:
    """(problem text, answer); for a subtraction the first number is the larger, so answers are >= 0."""
    story, op = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    a, b = (int(x) for x in rng.integers(low, high + 1, size=2))
    if op == "-" and a < b:
        a, b = b, a
    who, what = NAMES[int(rng.integers(len(NAMES)))], THINGS[int(rng.integers(len(THINGS)))]
    text = story.format(who=who, a=a, b=b, what=what) + INSTRUCTION
    return text, a + b if op == "+" else a - b


def make_split(n_train: int, n_eval: int, seed: int, low: int = 1, high: int = 10) -> tuple[list[dict], list[dict]]:
    """Disjoint train and eval problems (by text), drawn from one seeded stream."""
    if n_train < 0 or n_eval < 0 or not 0 <= low <= high:
        raise UserError(f"need counts >= 0 and 0 <= low <= high, got {n_train}, {n_eval}, {low}, {high}")
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    tries = 0
    while len(rows) < n_train + n_eval:
        tries += 1
        if tries > 100 * (n_train + n_eval) + 1000:
            raise UserError(f"only {len(rows)} distinct problems in numbers {low}..{high}; widen the range")
        text, answer = make_problem(rng, low, high)
        if text not in seen:
            seen.add(text)
            split = "train" if len(rows) < n_train else "eval"
            index = len(rows) if split == "train" else len(rows) - n_train
            rows.append({"id": f"{split}-{index}", "problem": text, "answer": str(answer)})
    return rows[:n_train], rows[n_train:]


def write_split(output: Path, n_train: int, n_eval: int, seed: int, low: int, high: int) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("train", "eval"), make_split(n_train, n_eval, seed, low, high)):
        with (output / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--low", type=int, default=1, help="smallest number in a story")
    parser.add_argument("--high", type=int, default=10, help="largest number in a story")
    args = parser.parse_args(argv)
    write_split(args.output, args.train, args.eval, args.seed, args.low, args.high)
    print(f"wrote {args.output}/train.jsonl ({args.train}) and eval.jsonl ({args.eval})")


if __name__ == "__main__":
    main()
