"""The per-batch work of `redi data pair`, run in worker processes (or inline): decode rows, apply the row rules,
decontaminate, pick the SFT traces and pairs, measure lengths, and build the output rows as Arrow tables.

A ``BatchResult`` carries everything back to the main process: counters (merged by addition, so the result
does not depend on which worker did what), the malformed/contaminated lists, the output tables (with a
``_row`` column, the input row each came from, used to sort them into the output order), and the rows that
still need math-verify grading (flat rows without labels: the main process grades them in its own pool,
since a worker cannot start processes of its own).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from redi.pairing.filters import Decontaminator, Histogram, LengthMeter
from redi.pairing.rules import DROP_REASONS, Candidate, Drop, RowRules, select
from redi.pairing.sinks import bucketize, shuffled_positions
from redi.pairing.decode import BadLine, FileRange, Task, count_range, decode_task

HISTOGRAMS = ("sft_completion", "pair_prompt", "pair_chosen", "pair_rejected")
COUNTERS = ("rows_read", "sft_problems", "sft_rows", "no_incorrect", "too_long_rows", "pairs", "pairs_too_long",
            "null_labels", "graded", "graded_format_errors", "graded_timeouts")


@dataclass
class Tally:
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    dropped: dict = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    malformed: list = field(default_factory=list)
    contaminated: list = field(default_factory=list)
    hist: dict = field(default_factory=dict)

    def drop(self, drop: Drop) -> None:
        self.dropped[drop.reason] += 1
        if drop.reason == "malformed":
            # Row numbers users see are 1-based, as in `redi train` and jsonl line numbers.
            entry = {"row": drop.row + 1, "id": drop.problem_id, "reason": drop.detail}
            self.malformed.append({k: v for k, v in entry.items() if v is not None})

    def histogram(self, name: str, unit: str) -> Histogram:
        if name not in self.hist:
            self.hist[name] = Histogram(unit)
        return self.hist[name]

    def merge(self, other: "Tally") -> None:
        for key, value in other.counts.items():
            self.counts[key] += value
        for key, value in other.dropped.items():
            self.dropped[key] += value
        self.malformed.extend(other.malformed)
        self.contaminated.extend(other.contaminated)
        for name, hist in other.hist.items():
            self.histogram(name, hist.unit).merge(hist)


@dataclass
class BatchResult:
    tally: Tally
    sft: tuple | None = None  # (table sorted by output bucket, bucket bounds): see pairing_sinks.bucketize
    pairs: tuple | None = None
    deferred: list = field(default_factory=list)  # Candidates whose generations need grading


@dataclass(frozen=True)
class WorkSpec:
    """What a worker needs to rebuild the rules, filters and tokenizer in its own process (picklable)."""

    schema: str
    columns: tuple[str, ...]
    correct_if: str | None
    exclude_sources: tuple[str, ...]
    require_complete: bool
    pairs_per_problem: int
    all_positives: bool
    tokenizer: str | None
    max_prompt_tokens: int
    max_response_tokens: int
    decontaminate: tuple[str, ...]
    ngram_size: int


@dataclass(frozen=True)
class Layout:
    """Where output rows go: ``total`` input rows, shuffled with ``seed`` (None = input order), B buckets."""

    total: int
    buckets: int
    seed: int | None


class BatchWorker:
    def __init__(self, spec: WorkSpec, parallel_tokenizer: bool = True):
        self.spec = spec
        self.layout: Layout | None = None
        self.positions = None  # input row -> output position (numpy), None = input order
        self.parallel_tokenizer = parallel_tokenizer
        self.rules = RowRules(spec.schema, correct_if=spec.correct_if, exclude_sources=spec.exclude_sources,
                              require_complete=spec.require_complete)
        self.decon = Decontaminator(list(spec.decontaminate), spec.ngram_size) if spec.decontaminate else None
        self._meter: LengthMeter | None = None
        self.unit = "tokens" if spec.tokenizer else "chars"

    @property
    def meter(self) -> LengthMeter | None:
        if self._meter is None and self.spec.tokenizer:
            self._meter = LengthMeter(self.spec.tokenizer, parallel=self.parallel_tokenizer)
        return self._meter

    def set_layout(self, layout: Layout) -> None:
        if layout != self.layout:
            # Each worker derives the permutation itself (~10 ms per 500k rows) rather than receive it.
            self.positions = None if layout.seed is None else shuffled_positions(layout.total, layout.seed)
            self.layout = layout

    def process(self, task: Task) -> BatchResult:
        """Rows of one input task -> outputs; unlabelled rows come back in ``deferred`` for grading."""
        tally = Tally()
        ready: list[Candidate] = []
        deferred: list[Candidate] = []
        inspect, decon = self.rules.inspect, self.decon
        for row_index, row in decode_task(task, list(self.spec.columns)):
            tally.counts["rows_read"] += 1
            if isinstance(row, BadLine):
                tally.drop(Drop(row_index, "malformed", row.detail))
                continue
            verdict = inspect(row_index, row)
            if isinstance(verdict, Drop):
                tally.drop(verdict)
                continue
            if decon is not None:
                hit = decon.match(verdict.problem)
                if hit is not None:
                    tally.drop(Drop(row_index, "contaminated", hit[0], verdict.problem_id))
                    tally.contaminated.append({"row": row_index + 1, "id": verdict.problem_id, "benchmark": hit[0],
                                               "ngram": hit[1]})
                    continue
            (ready if verdict.correct is not None else deferred).append(verdict)
        result = self.finish(ready, tally)
        result.deferred = deferred
        return result

    def finish(self, candidates: list[Candidate], tally: Tally | None = None) -> BatchResult:
        """Labelled candidates -> SFT rows and pairs (first correct; first not-correct), length-filtered."""
        spec = self.spec
        tally = tally or Tally()
        counts = tally.counts
        picked = []
        for c in candidates:
            counts["null_labels"] += c.null_labels
            sft, pairs = select(c.correct, pairs_per_problem=spec.pairs_per_problem,
                                all_positives=spec.all_positives)
            if not sft:
                tally.drop(Drop(c.row, "no_correct_trace", "", c.problem_id))
                continue
            picked.append((c, sft, pairs))
        lengths = self._measure(picked)
        hist = {name: tally.histogram(name, self.unit) for name in HISTOGRAMS}
        sft_rows: list[tuple] = []
        pair_rows: list[tuple] = []
        sft_from: list[int] = []
        pair_from: list[int] = []
        for c, sft, pairs in picked:
            gens = c.generations
            counts["sft_problems"] += 1
            for g in sft:
                hist["sft_completion"].add(lengths[(c.row, g)] if lengths else len(gens[g]))
                sft_rows.append((c.problem, gens[g], c.problem_id, c.source, g))
                sft_from.append(c.row)
            if not pairs:
                counts["no_incorrect"] += 1
                continue
            kept = 0
            for good, bad in pairs:
                if lengths:
                    sizes = (lengths[(c.row, "prompt")], lengths[(c.row, good)], lengths[(c.row, bad)])
                    if sizes[0] > spec.max_prompt_tokens or max(sizes[1:]) > spec.max_response_tokens:
                        counts["pairs_too_long"] += 1
                        continue
                else:
                    sizes = (len(c.problem), len(gens[good]), len(gens[bad]))
                kept += 1
                for name, size in zip(HISTOGRAMS[1:], sizes):
                    hist[name].add(size)
                pair_rows.append((c.problem, gens[good], gens[bad], c.problem_id, c.source, good, bad))
                pair_from.append(c.row)
            if not kept:
                counts["too_long_rows"] += 1
        counts["sft_rows"] += len(sft_rows)
        counts["pairs"] += len(pair_rows)
        return BatchResult(tally, self._bucketize("sft", sft_rows, sft_from),
                           self._bucketize("pairs", pair_rows, pair_from))

    def _bucketize(self, kind: str, records: list[tuple], rows: list[int]) -> tuple:
        return bucketize(kind, records, rows, self.positions, self.layout.buckets, self.layout.total)

    def _measure(self, picked) -> dict | None:
        """Token lengths of every prompt and trace that may be written, in one batched call per kind."""
        meter = self.meter
        if meter is None or not picked:
            return None
        prompt_rows = [c for c, _, pairs in picked if pairs]
        keys = list(dict.fromkeys((c.row, g) for c, sft, pairs in picked
                                  for g in [*sft, *(i for pair in pairs for i in pair)]))
        by_row = {c.row: c for c, _, _ in picked}
        lengths: dict = dict(zip(((c.row, "prompt") for c in prompt_rows),
                                 meter.prompt_lengths([c.problem for c in prompt_rows])))
        lengths.update(zip(keys, meter.response_lengths([by_row[r].generations[g] for r, g in keys])))
        return lengths


# ------------------------------------------------------------------------------------- worker processes

_WORKER: BatchWorker | None = None


def init_worker(spec: WorkSpec) -> None:
    import os
    import signal

    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and ends the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker per core already
    use_system_allocator()
    _WORKER = BatchWorker(spec, parallel_tokenizer=False)


def use_system_allocator():
    """Make Arrow allocate with malloc; returns the previous pool so the caller can restore it.

    Measured here: with the default mimalloc, freed pages are returned to the OS within milliseconds and
    re-faulted on the next batch, which made building the output tables cost more than parsing the JSON.
    """
    import pyarrow as pa

    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    return previous


class CountJob(NamedTuple):
    """The count pass: rows and lines of one byte range."""

    file_range: FileRange


class ProcessJob(NamedTuple):
    """The reading pass: one task's rows to outputs, placed by ``layout``."""

    task: Task
    layout: Layout


def run_job(job: CountJob | ProcessJob):
    """CountJob -> (rows, lines); ProcessJob -> BatchResult."""
    if isinstance(job, CountJob):
        return count_range(job.file_range)
    assert _WORKER is not None
    return run_process(_WORKER, job)


def run_process(worker: BatchWorker, job: ProcessJob) -> BatchResult:
    worker.set_layout(job.layout)
    return worker.process(job.task)
