"""The paper's row rules for `redi data pair`: which rows count, which traces are correct, which get paired.

Everything here is per row and pure (no I/O), so each rule can be tested on a hand-built row. The rules follow
the authors' scripts (spec §4.2-§4.4; R `clean_base_shuffled.py`, `clean_base_shuffled_dpo.py`):

- A row is counted once, under the first rule it fails, checked in the authors' order: not a JSON object
  (malformed), ``problem_is_valid`` (invalid), ``source`` (excluded_source), then structure (malformed:
  problem, generations, label lists); after these, in pairing_work.py, contamination and "no correct trace".
- ``problem_is_valid``: when the key is present, the row is kept only if it is a string equal to "yes" after
  ``strip().lower()``; null counts as not "yes" (the authors' ``isinstance(v, str) and ...``). Absent key: no check.
- ``source``: exact, case-sensitive match against the excluded list (the authors' ``==``).
- Correct = every configured verifier says true; null is false. ``math-verify`` means the re-parsed label
  (``math_verify_reparsed_answer``) in openr1-raw, never ``math_verify_answer``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

SCHEMAS = ("openr1-raw", "openr1-220k", "flat")
CORRECT_IF = ("both", "any", "math-verify", "llama")

# The reasons a row is left out of both sets (report.json "rows_dropped"); see the module docstring for order.
DROP_REASONS = ("malformed", "invalid", "excluded_source", "contaminated", "no_correct_trace")

# Which list holds each verifier's per-generation labels, per schema.
_LABEL_KEYS = {
    "openr1-raw": {"llama": "llama_verification", "math-verify": "math_verify_reparsed_answer"},
    "openr1-220k": {"llama": "correctness_llama", "math-verify": "correctness_math_verify"},
}
_ID_KEYS = ("problem_id", "uuid", "id")


@dataclass
class Candidate:
    """A row that passed the row rules; ``correct`` is None until its generations are graded (flat, no labels)."""

    row: int
    problem_id: str
    problem: str
    source: str | None
    generations: list[str]
    correct: list[bool] | None
    answer: object = None
    null_labels: int = 0  # configured labels that were null (counted as false)


@dataclass
class Drop:
    row: int
    reason: str  # one of DROP_REASONS
    detail: str = ""
    problem_id: str | None = None


def detect_schema(columns: list[str] | set[str]) -> str | None:
    """Schema from the column names: the nested ``correctness`` struct marks OpenR1-Math-Raw."""
    cols = set(columns)
    if "correctness" in cols:
        return "openr1-raw"
    if "correctness_math_verify" in cols or "correctness_llama" in cols:
        return "openr1-220k"
    if "generations" in cols and "problem" in cols:
        return "flat"
    return None


def required_columns(schema: str, correct_if: str | None) -> list[str]:
    """Columns without which no row of this schema can be used (checked up front where columns are known)."""
    if schema == "openr1-raw":
        return ["problem", "generations", "correctness"]
    if schema == "openr1-220k":
        return ["problem", "generations"] + [_LABEL_KEYS[schema][v] for v in verifiers(correct_if)]
    return ["problem", "generations"]


def needed_columns(schema: str) -> list[str]:
    """Every column the rules may read (the readers project to these, so big unused columns stay on disk)."""
    base = ["problem", "generations", "source", "problem_is_valid", "answer", *_ID_KEYS]
    if schema == "openr1-raw":
        return base + ["correctness"]
    if schema == "openr1-220k":
        return base + ["correctness_math_verify", "correctness_llama", "is_reasoning_complete"]
    return base + ["correct"]


def verifiers(correct_if: str | None) -> tuple[str, ...]:
    if correct_if in (None, "both", "any"):
        return ("llama", "math-verify")
    return (correct_if,)


def problem_id_of(row: dict, row_index: int) -> str:
    for key in _ID_KEYS:
        value = row.get(key)
        if value is not None and value != "":
            return str(value)
    return f"row-{row_index}"


def _number(value) -> bool:
    # 0/1 (and floats) are read with bool(), as the authors' code did; bool itself is handled before.
    return type(value) in (int, float)


class RowRules:
    """Applies the row rules of one run (schema + options) to parsed rows."""

    def __init__(self, schema: str, *, correct_if: str | None = None, exclude_sources=("cn_k12",),
                 require_complete: bool = True):
        if schema not in SCHEMAS:
            raise ValueError(schema)
        self.schema = schema
        self.correct_if = correct_if or "both"
        self.exclude_sources = frozenset(exclude_sources)
        self.require_complete = require_complete

    def inspect(self, row_index: int, row) -> Candidate | Drop:
        if not isinstance(row, dict):
            return Drop(row_index, "malformed", f"row is a JSON {type(row).__name__}, not an object")
        pid = problem_id_of(row, row_index)
        if "problem_is_valid" in row:
            valid = row["problem_is_valid"]
            if not (isinstance(valid, str) and valid.strip().lower() == "yes"):
                return Drop(row_index, "invalid", f"problem_is_valid={valid!r}", pid)
        source = row.get("source")
        if source is not None and not isinstance(source, str):
            return Drop(row_index, "malformed", "field source is not a string", pid)
        if source in self.exclude_sources:
            return Drop(row_index, "excluded_source", source, pid)

        problem = row.get("problem")
        if not isinstance(problem, str) or not problem:
            what = "missing field problem" if problem in (None, "") else "field problem is not a string"
            return Drop(row_index, "malformed", what, pid)
        gens = row.get("generations")
        if gens is None:
            return Drop(row_index, "malformed", "missing field generations", pid)
        if not isinstance(gens, list):
            return Drop(row_index, "malformed", "field generations is not a list", pid)
        if not gens:
            return Drop(row_index, "malformed", "empty generations", pid)
        if any(type(gen) is not str for gen in gens):
            bad = next(i for i, gen in enumerate(gens) if not isinstance(gen, str))
            return Drop(row_index, "malformed", f"generations[{bad}] is not a string", pid)

        try:
            correct, nulls = self._labels(row, len(gens))
        except _BadRow as err:
            return Drop(row_index, "malformed", str(err), pid)
        answer = row.get("answer")
        if correct is None and (answer is None or answer == "" or answer == []):
            return Drop(row_index, "malformed", "missing field answer (needed to grade unlabelled generations)",
                        pid)
        return Candidate(row_index, pid, problem, source, gens, correct, answer, nulls)

    # -- labels ---------------------------------------------------------------------------------------------

    def _labels(self, row: dict, n: int) -> tuple[list[bool] | None, int]:
        """Per-generation correctness and the number of null labels; None means "grade with math-verify"."""
        if self.schema == "flat":
            flags = row.get("correct")
            if flags is None:
                return None, 0
            values = self._label_list(flags, "correct", n)
            return list(map(bool, values)), values.count(None)

        keys = _LABEL_KEYS[self.schema]
        if self.schema == "openr1-raw":
            holder = row.get("correctness")
            if holder is None:
                raise _BadRow("missing field correctness")
            if not isinstance(holder, dict):
                raise _BadRow("field correctness is not an object")
            prefix = "correctness."
        else:
            holder, prefix = row, ""
        columns = []
        nulls = 0
        for verifier in verifiers(self.correct_if):
            key = keys[verifier]
            raw = holder.get(key)
            if raw is None and self.schema == "openr1-220k":
                # OpenR1-Math-220k leaves correctness_llama null where the judge was not run: all labels null.
                raw = [None] * n
            values = self._label_list(raw, prefix + key, n)
            nulls += values.count(None)
            columns.append(list(map(bool, values)))  # bool(None) is False: a null label is not a yes
        if len(columns) == 1:
            correct = columns[0]
        elif self.correct_if == "any":
            correct = [a or b for a, b in zip(*columns)]
        else:
            correct = [a and b for a, b in zip(*columns)]

        if self.require_complete and self.schema == "openr1-220k" and row.get("is_reasoning_complete") is not None:
            # A truncated trace is never a positive, whatever its labels say; it can still be the rejected one.
            complete = self._label_list(row["is_reasoning_complete"], "is_reasoning_complete", n)
            correct = [c and bool(done) for c, done in zip(correct, complete)]
        return correct, nulls

    @staticmethod
    def _label_list(raw, name: str, n: int) -> list[bool | None]:
        if raw is None:
            raise _BadRow(f"missing field {name}")
        if not isinstance(raw, (list, tuple)):
            raise _BadRow(f"field {name} is not a list")
        if len(raw) != n:
            raise _BadRow(f"{name} has {len(raw)} labels for {n} generations")
        for value in raw:
            if value is not True and value is not False and value is not None and not _number(value):
                # A string like "False" would be truthy under the authors' bool(); refuse it rather than guess.
                raise _BadRow(f"{name} holds a {type(value).__name__} label, not a boolean")
        return list(raw)


class _BadRow(Exception):
    pass


def select(correct: list[bool], *, pairs_per_problem: int = 1, all_positives: bool = False,
           ) -> tuple[list[int], list[tuple[int, int]]]:
    """(SFT generation indices, (chosen, rejected) index pairs) for one problem, in generation order.

    Paper: SFT = the first correct trace; pair = (first correct, first not-correct), one per problem.
    ``all_positives``: SFT takes every correct trace, in order. ``pairs_per_problem`` N > 1: the first N of
    all (correct, not-correct) combinations, chosen-major, i.e. (c0,r0), (c0,r1), ..., (c1,r0), ...; 0 = all.
    Pair 1 is always the paper's pair.
    """
    good = [i for i, ok in enumerate(correct) if ok]
    if not good:
        return [], []
    bad = [i for i, ok in enumerate(correct) if not ok]
    sft = good if all_positives else good[:1]
    # The first N chosen-major combinations, generated lazily: 10,000 traces of one problem would otherwise
    # build 25M pairs (~1.9 GB) to keep one.
    combinations = ((c, r) for c in good for r in bad)
    if pairs_per_problem > 0:
        combinations = itertools.islice(combinations, pairs_per_problem)
    return sft, list(combinations)
