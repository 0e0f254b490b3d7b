"""The built-in demo task: column addition written by a teacher that sometimes takes a risky shortcut.

``builtin:demo`` (model and data) registers here. The data builder writes the same files and columns as
``redi data pair``, so the demo goes through the real pipeline:

- ``teacher.jsonl``: every teacher generation per problem, in the ``flat`` schema (problem, answer,
  generations, correct), i.e. raw material ``redi data pair`` itself could read;
- ``sft.jsonl``: the first correct trace per problem (D_SFT);
- ``pairs.jsonl``: (first correct, first wrong) per problem that has both (D_Pref);
- ``eval.jsonl``: held-out problems (prompt, answer), disjoint from the training problems;
- ``data_info.json``: counts, and how many traces took shortcuts.

A trace for 457+68 (prompt ``457+68=?``) looks like::

    7+8+0=15>5        careful column: x+y+carry=sum, then the answer digits so far
    >25               shortcut column: only the digits, the sum is done "in the head"
    4+0+1=5>525
    c=0>525           final carry
    \\boxed{525}

Why the shortcut design (the prototype's finding, issue 4): when the teacher's mistakes are random slips
the student would never make, negatives only hurt. A shortcut, though, is something the SFT student learns
to do itself (successful shortcuts survive in the positives), and only the negatives show that it often
fails. The negatives are then plausible samples of the student's own distribution, which is the
mechanism the paper relies on.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from redi.builtin import DATA_BUILDERS, MODEL_ALPHABETS, MODEL_SHAPES
from redi.errors import UserError
from redi.pairing.rules import select
from redi.tiny import TinyQwen2

# 24 symbols + 3 special tokens = 27: digits, the operators of the trace, "c=" of the carry line, \boxed{}.
ALPHABET = "0123456789+=?>c\n\\boxed{}"
SOURCE = "demo-teacher"
# hidden 128, 3 layers: ~0.75M parameters; positions cover the longest trace (~120 characters) with room.
DEMO_SHAPE = TinyQwen2(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256)


@dataclass(frozen=True)
class TeacherModel:
    """How the teacher writes and errs. Every field is a ``task:`` key of the config."""

    min_digits: int = 3
    max_digits: int = 6
    shortcut_rate: float = 0.4  # chance a column is written as ">digits" only
    shortcut_error_rate: float = 0.3  # chance a shortcut confuses the carry (wrong digit)
    careful_error_rate: float = 0.005  # chance a written sum has a slipped digit
    max_tries: int = 8  # sampling until correct, as the paper's data: at most this many generations

    def __post_init__(self) -> None:
        for name in ("shortcut_rate", "shortcut_error_rate", "careful_error_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"config key 'task.{name}' must lie in [0, 1], got {getattr(self, name)!r}")
        if not 1 <= self.min_digits <= self.max_digits <= 9 or self.max_tries < 1:
            raise UserError("config keys 'task.min_digits' <= 'task.max_digits' must lie in 1..9 and "
                            "'task.max_tries' must be >= 1")

    @classmethod
    def from_task(cls, task: dict) -> "TeacherModel":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in task.items() if k in names})


@dataclass
class Trace:
    text: str
    answer: str  # what the teacher boxed
    shortcuts: int  # columns written as shortcuts
    errors: int  # columns where the teacher erred


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}=?"


def draw_problem(rng: np.random.Generator, teacher: TeacherModel) -> tuple[int, int]:
    def number() -> int:
        digits = int(rng.integers(teacher.min_digits, teacher.max_digits + 1))
        return int(rng.integers(10 ** (digits - 1), 10 ** digits))

    return number(), number()


def _draw_unseen(rng: np.random.Generator, teacher: TeacherModel, seen: set[tuple[int, int]]) -> tuple[int, int]:
    """Draw until a problem not in ``seen`` comes up (train and eval never share one); mark it seen."""
    while True:
        a, b = draw_problem(rng, teacher)
        if (a, b) not in seen:
            seen.add((a, b))
            return a, b


def teacher_trace(a: int, b: int, rng: np.random.Generator, teacher: TeacherModel) -> Trace:
    """One teacher generation. The teacher carries on from what it wrote, right or wrong."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    width = max(len(xs), len(ys))
    carry, digits, lines, shortcuts, errors = 0, "", [], 0, 0
    for col in range(width):
        x = int(xs[col]) if col < len(xs) else 0
        y = int(ys[col]) if col < len(ys) else 0
        if rng.random() < teacher.shortcut_rate:
            shortcuts += 1
            total = x + y + carry
            if rng.random() < teacher.shortcut_error_rate:
                # Carry confusion: forgets the carry it holds, or adds one it does not.
                total = x + y + (1 - carry)
                errors += 1
            digits = str(total % 10) + digits
            lines.append(f">{digits}")
        else:
            total = x + y + carry
            if rng.random() < teacher.careful_error_rate:
                total = (total + int(rng.integers(1, 10))) % 19  # a slip: some other sum in 0..18
                errors += 1
            digits = str(total % 10) + digits
            lines.append(f"{x}+{y}+{carry}={total}>{digits}")
        carry = total // 10
    answer = (str(carry) if carry else "") + digits
    lines.append(f"c={carry}>{answer}")
    lines.append(f"\\boxed{{{answer}}}")
    return Trace("\n" + "\n".join(lines), answer, shortcuts, errors)


def sample_until_correct(a: int, b: int, rng: np.random.Generator, teacher: TeacherModel) -> list[Trace]:
    """The paper's sampling: generate until a correct trace appears, at most ``max_tries`` times."""
    traces: list[Trace] = []
    for _ in range(teacher.max_tries):
        traces.append(teacher_trace(a, b, rng, teacher))
        if traces[-1].answer == str(a + b):
            break
    return traces


# Keys of the config's ``task:`` section besides the teacher's (evaluation keys are read by redi.experiments.demo).
OTHER_TASK_KEYS = ("problems", "eval_problems", "eval_samples", "eval_temperature", "eval_top_p",
                   "eval_max_new_tokens", "eval_after_sft", "control", "model")


def check_task(task: dict) -> None:
    """Refuse unknown ``task:`` keys (a typo would silently fall back to a default), naming the closest."""
    known = [f.name for f in fields(TeacherModel)] + list(OTHER_TASK_KEYS)
    for key in task:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"; did you mean 'task.{close[0]}'?" if close else f"; valid: {', '.join(known)}"
            raise UserError(f"unknown config key 'task.{key}' for the demo task{hint}")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def build_demo_data(out_dir: Path, seed: int, task: dict) -> None:
    """Write teacher.jsonl, sft.jsonl, pairs.jsonl, eval.jsonl and data_info.json into ``out_dir``."""
    check_task(task)
    teacher = TeacherModel.from_task(task)
    n_train = int(task.get("problems", 4000))
    n_eval = int(task.get("eval_problems", 400))
    # Separate streams: changing the error model does not change the problems, and vice versa.
    problem_rng = np.random.default_rng([seed, 0])
    teacher_rng = np.random.default_rng([seed, 1])
    eval_rng = np.random.default_rng([seed, 2])

    seen: set[tuple[int, int]] = set()
    raw, sft, pairs = [], [], []
    stats = {"generations": 0, "correct": 0, "shortcut_columns": 0, "columns": 0, "unsolved": 0}
    while len(raw) < n_train:
        a, b = _draw_unseen(problem_rng, teacher, seen)
        pid = f"demo-{len(raw)}"
        prompt = prompt_of(a, b)
        traces = sample_until_correct(a, b, teacher_rng, teacher)
        correct = [t.answer == str(a + b) for t in traces]
        raw.append({"problem_id": pid, "problem": prompt, "answer": str(a + b), "source": SOURCE,
                    "generations": [t.text for t in traces], "correct": correct})
        stats["generations"] += len(traces)
        stats["correct"] += sum(correct)
        stats["shortcut_columns"] += sum(t.shortcuts for t in traces)
        stats["columns"] += len(traces) * max(len(str(a)), len(str(b)))
        sft_indices, pair_indices = select(correct)  # the paper's rule, as `redi data pair` applies it
        if not sft_indices:
            stats["unsolved"] += 1
            continue
        good = sft_indices[0]
        sft.append({"prompt": prompt, "completion": traces[good].text, "problem_id": pid, "source": SOURCE,
                    "generation_index": good})
        for good, bad in pair_indices:
            pairs.append({"prompt": prompt, "chosen": traces[good].text, "rejected": traces[bad].text,
                          "problem_id": pid, "source": SOURCE, "chosen_index": good, "rejected_index": bad})

    evals = []
    while len(evals) < n_eval:
        a, b = _draw_unseen(eval_rng, teacher, seen)
        evals.append({"problem_id": f"demo-eval-{len(evals)}", "prompt": prompt_of(a, b), "answer": str(a + b)})

    out_dir = Path(out_dir)
    _write_jsonl(out_dir / "teacher.jsonl", raw)
    _write_jsonl(out_dir / "sft.jsonl", sft)
    _write_jsonl(out_dir / "pairs.jsonl", pairs)
    _write_jsonl(out_dir / "eval.jsonl", evals)
    info = {"problems": n_train, "sft_rows": len(sft), "pairs": len(pairs), "eval_problems": len(evals),
            "teacher": teacher.__dict__, **stats}
    (out_dir / "data_info.json").write_text(json.dumps(info, indent=2))


DATA_BUILDERS["demo"] = build_demo_data
MODEL_SHAPES["demo"] = DEMO_SHAPE
MODEL_ALPHABETS["demo"] = ALPHABET
