"""`redi data pair RAW --ablation verifier-signal`: the authors' verifier-signal ablation (redi-spec.md §4.6;
R ``experiments_trl/data_preprocess/ablation_verifier_signal.py``, July 2025). The paper reports no result for it.

The question it asks: does stage 2 learn from the verifier's signal, or only from seeing more traces? Problems
with a correct and an incorrect trace (Type A) are split in half; the SFT model sees G1's correct traces, G2's
*incorrect* ones and every Type-B problem's correct trace; stage 2 then trains on G1's pairs the right way round
(main) or on G2's pairs inverted (chosen = the incorrect trace). The authors' steps, line numbers from their script:

- Same row filters and seed-42 shuffle as `redi data pair` (``redi.pairing.rules``), but "incorrect" is
  stricter: **both** verifiers false (lines 178-186); correct stays both true. A trace one verifier accepts is
  neither. Type A: a correct and an incorrect trace; Type B: a correct trace only; the rest are left out.
- Type A, in shuffled order, is shuffled again with ``random.seed(123)`` and cut at ``len // 2``: G1 is the first
  half, G2 the rest (lines 242-249).
- Mixed SFT set: G1 correct, then G2 incorrect, then Type B correct, in that order (lines 254-307).
- Main pairs (G1: correct vs incorrect) and inverted pairs (G2: incorrect vs correct), each dropped when either
  response is over ``max_response_tokens`` (19,000) counted as raw tokens + 1, no chat template and no prompt
  limit (lines 344-444); only with ``--tokenizer``.
- The larger pair set is cut to the smaller one's size by ``random.seed(123); random.sample(...)`` (446-464).

Outputs under OUT: ``sft-mixed/sft.*``, ``main/pairs.*``, ``inverted/pairs.*`` (each a folder `redi train
--data` reads), ``split.jsonl`` (every Type A and B problem: its type, group and trace indices) and
``report.json``. Unlike the authors' script (a fresh uuid4 per problem), problem ids come from the row, so
reruns are identical. Memory holds the kept problems' two chosen traces, not the whole input.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from redi.atomic import write_text_atomic
from redi.errors import UserError
from redi.pairing.decode import BadLine
from redi.pairing.rules import DROP_REASONS, Candidate, Drop, RowRules, detect_schema, needed_columns
from redi.pairing.sinks import FileWriter, records_to_table, shuffled_positions
from redi.pairing.sources import open_source

ABLATIONS = ("verifier-signal",)
SPLIT_SEED = 123  # the authors' SPLIT_SEED: the Type-A split and the balancing sample
SETS = {"sft": "sft-mixed", "main": "main", "inverted": "inverted"}


@dataclass
class Problem:
    row: int
    problem_id: str
    problem: str
    source: str | None
    correct_index: int
    incorrect_index: int  # -1: none (Type B)
    correct: str
    incorrect: str | None
    group: int | None = None  # 1 or 2 for Type A


def strict_indices(both_true: list[bool], either_true: list[bool]) -> tuple[int, int]:
    """(first trace both verifiers accept, first trace both reject); -1 where there is none."""
    correct = next((i for i, ok in enumerate(both_true) if ok), -1)
    incorrect = next((i for i, ok in enumerate(either_true) if not ok), -1)
    return correct, incorrect


def split_type_a(type_a: list, seed: int = SPLIT_SEED) -> tuple[list, list]:
    """G1, G2: the list shuffled as ``random.seed(seed); random.shuffle(...)`` does, cut at len // 2."""
    shuffled = list(type_a)
    random.Random(seed).shuffle(shuffled)  # the same draws as the module-level generator after random.seed
    half = len(shuffled) // 2
    return shuffled[:half], shuffled[half:]


def balance(main: list, inverted: list, seed: int = SPLIT_SEED) -> tuple[list, list]:
    """Both sets cut to the smaller size; the larger one by ``random.seed(seed); random.sample(x, n)``."""
    n = min(len(main), len(inverted))
    cut = [random.Random(seed).sample(x, n) if len(x) > n else x for x in (main, inverted)]
    return cut[0], cut[1]


class _Reader:
    """Rows -> Type A / Type B problems under the strict rule, with counts of what was left out."""

    def __init__(self, schema: str, exclude_sources: tuple[str, ...], require_complete: bool):
        self.both = RowRules(schema, correct_if="both", exclude_sources=exclude_sources,
                             require_complete=require_complete)
        # "Both false" = not (llama or math-verify); completeness only ever limits what counts as correct.
        self.either = RowRules(schema, correct_if="any", exclude_sources=exclude_sources, require_complete=False)
        self.dropped = dict.fromkeys((r for r in DROP_REASONS if r != "contaminated"), 0)  # no --decontaminate
        self.malformed: list[dict] = []
        self.problems: list[Problem] = []
        self.no_correct = 0

    def add(self, row_index: int, row) -> None:
        bad_line = isinstance(row, BadLine)
        verdict = Drop(row_index, "malformed", row.detail) if bad_line else self.both.inspect(row_index, row)
        if isinstance(verdict, Drop):
            self.dropped[verdict.reason] += 1
            if verdict.reason == "malformed":
                self.malformed.append({"row": row_index + 1, "reason": verdict.detail})
            return
        either: Candidate = self.either.inspect(row_index, row)  # type: ignore[assignment]
        good, bad = strict_indices(verdict.correct, either.correct)
        if good < 0:
            self.no_correct += 1
            return
        gens = verdict.generations
        self.problems.append(Problem(row_index, verdict.problem_id, verdict.problem, verdict.source, good, bad,
                                     gens[good], gens[bad] if bad >= 0 else None))


def _read(input_spec: str, opts) -> tuple[_Reader, int, str]:
    source = open_source(str(input_spec), opts.split)
    schema = opts.schema or detect_schema(source.peek_columns())
    if schema not in ("openr1-raw", "openr1-220k"):
        raise UserError(f"--ablation verifier-signal needs both verifiers' labels per trace (schema openr1-raw "
                        f"or openr1-220k); {input_spec} is {schema or 'of unknown schema'}")
    reader = _Reader(schema, tuple(opts.exclude_sources), opts.require_complete)
    total = 0
    for batch in source.batches(needed_columns(schema), opts.batch_rows):
        for row_index, row in batch:
            total += 1
            reader.add(row_index, row)
    if opts.shuffle_seed is not None:  # the authors' order: datasets' shuffle(seed=42) of the whole input
        positions = shuffled_positions(total, opts.shuffle_seed)
        reader.problems.sort(key=lambda p: positions[p.row])
    return reader, total, schema


def _check(opts) -> None:
    fixed = {"--correct-if": opts.correct_if is not None, "--pairs-per-problem": opts.pairs_per_problem != 1,
             "--all-positives": opts.all_positives, "--decontaminate": bool(opts.decontaminate)}
    bad = [flag for flag, given in fixed.items() if given]
    if bad:
        raise UserError(f"{bad[0]} does not apply to --ablation verifier-signal: it fixes its own rules "
                        "(correct = both verifiers true, incorrect = both false, one pair per problem)")


def _pairs(group: list[Problem], inverted: bool, meter, limit: int) -> tuple[list[tuple], int]:
    """(pair records, number dropped as too long) for one group; inverted: chosen = the incorrect trace."""
    records = []
    for p in group:
        good, bad = (p.correct, p.correct_index), (p.incorrect, p.incorrect_index)
        (chosen, ci), (rejected, ri) = (bad, good) if inverted else (good, bad)
        records.append((p.problem, chosen, rejected, p.problem_id, p.source, ci, ri))
    if meter is None:
        return records, 0
    # The authors' measure: the response alone, no chat template, no special tokens, + 1 for EOS.
    chosen_len = meter.count([r[1] for r in records])
    rejected_len = meter.count([r[2] for r in records])
    kept = [r for r, a, b in zip(records, chosen_len, rejected_len) if a + 1 <= limit and b + 1 <= limit]
    return kept, len(records) - len(kept)


def _write_set(path: Path, kind: str, records: list[tuple], fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = FileWriter(path, kind, fmt)
    try:
        writer.write(records_to_table(kind, records))
    except BaseException:
        writer.abort()
        raise
    writer.close()


def _split_rows(problems: list[Problem], main_ids: set, inverted_ids: set) -> str:
    lines = []
    for p in problems:
        kind = "B" if p.incorrect_index < 0 else "A"
        in_pairs = p.problem_id in (main_ids if p.group == 1 else inverted_ids)
        lines.append(json.dumps({"problem_id": p.problem_id, "source": p.source, "type": kind, "group": p.group,
                                 "correct_index": p.correct_index,
                                 "incorrect_index": None if kind == "B" else p.incorrect_index,
                                 "in_pairs": in_pairs if kind == "A" else None}, ensure_ascii=False))
    return "\n".join(lines) + ("\n" if lines else "")


def verifier_signal(input_spec: str, output: str | Path, opts, *, force: bool = False) -> dict:
    """Write the four sets and report.json (see the module docstring); returns the report."""
    _check(opts)
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"--output {output} already holds files; choose another folder or pass --force")
    meter = None
    if opts.tokenizer:
        from redi.pairing.filters import LengthMeter

        meter = LengthMeter(opts.tokenizer)
    reader, total, schema = _read(input_spec, opts)
    type_a = [p for p in reader.problems if p.incorrect_index >= 0]
    type_b = [p for p in reader.problems if p.incorrect_index < 0]
    g1, g2 = split_type_a(type_a)
    for group, members in ((1, g1), (2, g2)):
        for p in members:
            p.group = group
    main, main_long = _pairs(g1, False, meter, opts.max_response_tokens)
    inverted, inverted_long = _pairs(g2, True, meter, opts.max_response_tokens)
    filtered = (len(main), len(inverted))
    main, inverted = balance(main, inverted)
    sft = ([(p.problem, p.correct, p.problem_id, p.source, p.correct_index) for p in g1]
           + [(p.problem, p.incorrect, p.problem_id, p.source, p.incorrect_index) for p in g2]
           + [(p.problem, p.correct, p.problem_id, p.source, p.correct_index) for p in type_b])
    fmt = opts.output_format
    out.mkdir(parents=True, exist_ok=True)
    _write_set(out / SETS["sft"] / f"sft.{fmt}", "sft", sft, fmt)
    _write_set(out / SETS["main"] / f"pairs.{fmt}", "pairs", main, fmt)
    _write_set(out / SETS["inverted"] / f"pairs.{fmt}", "pairs", inverted, fmt)
    main_ids, inverted_ids = {r[3] for r in main}, {r[3] for r in inverted}
    write_text_atomic(out / "split.jsonl", _split_rows(reader.problems, main_ids, inverted_ids))
    report = {
        "input": str(input_spec), "schema": schema, "ablation": "verifier-signal",
        "rules": "correct = both verifiers true; incorrect = both false (null = false); one-verifier traces: neither",
        "order": (f"datasets shuffle(seed={opts.shuffle_seed}) over all {total} input rows"
                  if opts.shuffle_seed is not None else "input order"),
        "split_seed": SPLIT_SEED, "rows_read": total, "rows_dropped": {**reader.dropped, "no_correct_trace": reader.no_correct},
        "type_a": len(type_a), "type_b": len(type_b), "group1": len(g1), "group2": len(g2),
        "sft_mixed": {"rows": len(sft), "group1_correct": len(g1), "group2_incorrect": len(g2),
                      "type_b_correct": len(type_b)},
        "main": {"from_group1": len(g1), "too_long": main_long, "after_length_filter": filtered[0], "pairs": len(main)},
        "inverted": {"from_group2": len(g2), "too_long": inverted_long, "after_length_filter": filtered[1],
                     "pairs": len(inverted)},
        "length_filter": None if meter is None else {
            "tokenizer": opts.tokenizer, "max_response_tokens": opts.max_response_tokens, "applies_to": "pairs",
            "measure": "raw response tokens + 1, no chat template; no prompt limit (the authors' ablation)"},
        "options": {k: v for k, v in asdict(opts).items() if k not in ("batch_rows", "workers")},
        "malformed": reader.malformed,
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def summary_rows(report: dict) -> list[tuple[str, str]]:
    rows = [("rows read", report["rows_read"])]
    rows += [(f"dropped: {k.replace('_', ' ')}", v) for k, v in report["rows_dropped"].items()]
    rows += [("Type A (correct and incorrect)", report["type_a"]), ("Type B (correct only)", report["type_b"]),
             ("G1 / G2", f"{report['group1']} / {report['group2']}"), ("mixed SFT rows", report["sft_mixed"]["rows"]),
             ("main pairs (G1)", report["main"]["pairs"]), ("inverted pairs (G2)", report["inverted"]["pairs"])]
    return [(name, f"{value:,}" if isinstance(value, int) else value) for name, value in rows]
