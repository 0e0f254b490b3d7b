"""`redi data pair`: teacher traces -> the SFT set (stage 1) and the preference pairs (stage 2), as the paper
built them (spec §4, pitfalls 9-10), streaming, at any input size.

Output folder: ``sft.parquet`` (prompt, completion, problem_id, source, generation_index), ``pairs.parquet``
(prompt, chosen, rejected, problem_id, source, chosen_index, rejected_index), both in TRL's conversational
form (prompt = [user], completion/chosen/rejected = [assistant]), and ``report.json``; ``--format jsonl``
writes ``.jsonl`` files instead. ``redi train --data OUT`` reads the folder as is.

Defaults are the paper's: correct = llama AND re-parsed math-verify; SFT = first correct trace; one pair per
problem = (first correct, first not-correct); cn_k12 and invalid problems out; pairs with a prompt over 800
or a response over 19,000 tokens out when a tokenizer is given (SFT is not length-filtered). Beyond the paper
(off by default): ``pairs_per_problem`` N > 1 (0 = all) takes the first N (correct, not-correct) combinations,
chosen-major; ``all_positives`` puts every correct trace in the SFT set; ``decontaminate`` drops problems
sharing a word 8-gram with a benchmark (the authors only reported them).

Order: the authors shuffled the whole raw set with ``datasets``' ``shuffle(seed=42)`` before processing, and
their output keeps that order. We reproduce it exactly (``shuffle_seed=42``, the default): ``datasets`` draws
``np.random.default_rng(42).permutation(N)`` over all N input rows, so once the rows are counted each worker
knows every row's output position, and the writers sort the streamed results into it (an external bucket
sort, pairing_sinks). ``shuffle_seed=None`` keeps the input order. Either way reruns are byte-identical, with
any number of workers.

Work is split so the main process stays light: it hands out byte ranges / row groups (pairing_sources,
pairing_decode); worker processes decode, apply the rules (pairing_rules), decontaminate and measure lengths
(pairing_filters) and build Arrow tables (pairing_work); the main process merges counters, spills tables into
sort buckets and writes the files. Unlabelled flat rows are graded with math-verify (redi.evaluation.grading) from the
main process, in that module's own worker pool.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from redi.errors import UserError
from redi.pairing.decode import count_range
from redi.pairing.filters import Histogram
from redi.pairing.rules import CORRECT_IF, SCHEMAS, Drop, detect_schema, needed_columns, required_columns
from redi.pairing.sinks import BucketedSink, FileWriter, bucket_count
from redi.outputs import refuse_overwriting_inputs
from redi.pairing.sources import open_source
from redi.pairing.work import (HISTOGRAMS, BatchWorker, CountJob, Layout, ProcessJob, Tally, WorkSpec, init_worker,
                               run_job, run_process, use_system_allocator)

FORMATS = ("parquet", "jsonl")
_PARALLEL_MIN_BYTES = 32 << 20
_GRADE_BATCH = 4096  # generations per math-verify call (one worker pool start per call)


@dataclass
class PairOptions:
    schema: str | None = None  # None: detected from the columns
    split: str = "train"
    correct_if: str | None = None  # None: "both" (llama AND re-parsed math-verify); flat rows use their own flags
    exclude_sources: tuple[str, ...] = ("cn_k12",)
    pairs_per_problem: int = 1  # 0 = every (correct, not-correct) combination
    all_positives: bool = False
    require_complete: bool = True  # openr1-220k: a trace with is_reasoning_complete false is never correct
    tokenizer: str | None = None
    max_prompt_tokens: int = 800
    max_response_tokens: int = 19_000
    decontaminate: tuple[str, ...] = ()
    ngram_size: int = 8
    shuffle_seed: int | None = 42
    output_format: str = "parquet"
    workers: int | None = None  # processes for decoding/rules and math-verify; None = all cores (if > 32 MB)
    grade_timeout: float = 5.0
    batch_rows: int = 1024


@dataclass
class PairResult:
    report: dict
    out_dir: Path
    seconds: float


def _check_options(opts: PairOptions) -> None:
    if opts.schema is not None and opts.schema not in SCHEMAS:
        raise UserError(f"unknown --schema {opts.schema!r} (choose from {', '.join(SCHEMAS)})")
    if opts.correct_if is not None and opts.correct_if not in CORRECT_IF:
        raise UserError(f"unknown --correct-if {opts.correct_if!r} (choose from {', '.join(CORRECT_IF)})")
    if opts.output_format not in FORMATS:
        raise UserError(f"unknown --format {opts.output_format!r} (choose from {', '.join(FORMATS)})")
    if opts.pairs_per_problem < 0:
        raise UserError("--pairs-per-problem must be >= 0 (0 = every combination)")
    if opts.max_prompt_tokens < 1 or opts.max_response_tokens < 1:
        raise UserError("--max-prompt-tokens and --max-response-tokens must be >= 1")
    if opts.ngram_size < 1:
        raise UserError("--ngram-size must be >= 1")
    if opts.workers is not None and opts.workers < 0:
        raise UserError("--workers must be >= 0")
    if opts.grade_timeout <= 0:
        raise UserError("--grade-timeout must be > 0")
    if opts.batch_rows < 1:
        raise UserError("batch_rows must be >= 1")


def _rule_text(schema: str, correct_if: str | None) -> str:
    if schema == "flat":
        return "the row's `correct` flags; math-verify against `answer` where a row has none"
    names = {"openr1-raw": ("correctness.llama_verification", "correctness.math_verify_reparsed_answer"),
             "openr1-220k": ("correctness_llama", "correctness_math_verify")}[schema]
    text = {"both": f"{names[0]} AND {names[1]}", "any": f"{names[0]} OR {names[1]}",
            "llama": names[0], "math-verify": names[1]}[correct_if or "both"]
    return text + " (null = false)"


def _open_inputs(input_spec: str, opts: PairOptions):
    source = open_source(str(input_spec), opts.split)
    columns = source.peek_columns()
    schema = opts.schema or detect_schema(columns)
    if schema is None:
        shown = ", ".join(columns[:12]) or "none found"
        raise UserError(f"cannot tell the schema of {input_spec} from its columns ({shown}); pass --schema")
    if schema == "flat" and opts.correct_if is not None:
        raise UserError("--correct-if applies to openr1-raw and openr1-220k; flat rows use their `correct` flags "
                        "or are graded with math-verify")
    if source.columns is not None:
        missing = [c for c in required_columns(schema, opts.correct_if) if c not in source.columns]
        if missing:
            raise UserError(f"{input_spec}: no column '{missing[0]}', which schema {schema} needs")
    return source, schema


def _worker_count(opts: PairOptions, source) -> int:
    """Processes for decoding and rules: every core for big inputs; in-process below ~32 MB (start-up ~1 s)."""
    if opts.workers is not None:
        return opts.workers
    cores = os.cpu_count() or 1
    small = source.size_bytes is not None and source.size_bytes < _PARALLEL_MIN_BYTES
    return 1 if cores < 2 or small else cores


class _Executor:
    """Runs jobs in order, inline or in a worker pool kept for the whole run (count pass, then the rows).

    At most four jobs per worker are in flight, so memory stays bounded however large the input.
    """

    def __init__(self, worker: BatchWorker, spec: WorkSpec, processes: int):
        self.worker, self.spec, self.processes = worker, spec, processes
        self._pool = None

    def __enter__(self) -> "_Executor":
        if self.processes > 1:
            import multiprocessing

            methods = multiprocessing.get_all_start_methods()
            # Not fork: pyarrow and tokenizers may hold threads whose locks a fork would copy mid-state.
            ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            if ctx.get_start_method() == "forkserver":
                ctx.set_forkserver_preload(["redi.pairing.work"])
            self._pool = ctx.Pool(self.processes, initializer=init_worker, initargs=(self.spec,))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def map(self, jobs):
        if self._pool is None:
            for job in jobs:
                yield count_range(job.file_range) if isinstance(job, CountJob) else run_process(self.worker, job)
            return
        pending: deque = deque()
        for job in jobs:
            pending.append(self._pool.apply_async(run_job, (job,)))
            if len(pending) >= 4 * self.processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def count_ranges(self, func, ranges):
        # InputSource.count_rows's mapper; func is always pairing_decode.count_range.
        return self.map(CountJob(r) for r in ranges)


def _grade(candidates: list, opts: PairOptions, tally: Tally) -> list:
    """Math-verify every generation of unlabelled rows (worker processes, one call for the lot)."""
    from redi.evaluation.grading import gold_latex, grade_many

    usable = []
    for c in candidates:
        try:
            gold_latex(c.answer)
            usable.append(c)
        except ValueError:
            tally.drop(Drop(c.row, "malformed", "field answer is not a string, number or list of them",
                            c.problem_id))
    responses = [g for c in usable for g in c.generations]
    answers = [c.answer for c in usable for _ in c.generations]
    verdicts = grade_many(responses, answers, workers=opts.workers, timeout=opts.grade_timeout,
                          require_boxed=True) if responses else []
    at = 0
    for c in usable:
        chunk = verdicts[at:at + len(c.generations)]
        at += len(c.generations)
        c.correct = [v.correct for v in chunk]
        tally.counts["graded"] += len(chunk)
        tally.counts["graded_format_errors"] += sum(v.format_error for v in chunk)
        tally.counts["graded_timeouts"] += sum(bool(getattr(v, "timed_out", False)) for v in chunk)
    return usable


def pair_dataset(input_spec: str, output: str | Path, options: PairOptions | None = None, *,
                 on_progress: Callable[[int, int | None], None] | None = None, force: bool = False) -> PairResult:
    """Build ``sft.*``, ``pairs.*`` and ``report.json`` in ``output`` from a file, folder or hub name.
    An existing non-empty ``output`` is refused unless ``force`` (its files of those names are replaced)."""
    opts = options or PairOptions()
    _check_options(opts)
    started = time.perf_counter()
    source, schema = _open_inputs(input_spec, opts)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {output} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "a training run" if (out / "metrics.jsonl").exists() else "files"
        raise UserError(f"--output {output} already holds {what}; choose another folder or pass --force to "
                        f"replace sft.*, pairs.* and report.json there")
    refuse_overwriting_inputs(source.paths, [out / name for name in _output_names()])
    spec = WorkSpec(schema, tuple(needed_columns(schema)), opts.correct_if, tuple(opts.exclude_sources),
                    opts.require_complete, opts.pairs_per_problem, opts.all_positives, opts.tokenizer,
                    opts.max_prompt_tokens, opts.max_response_tokens, tuple(opts.decontaminate), opts.ngram_size)
    worker = BatchWorker(spec)  # loads the benchmark files and the tokenizer now: bad ones fail fast
    _ = worker.meter
    out.mkdir(parents=True, exist_ok=True)
    import pyarrow as pa

    previous_pool = use_system_allocator()
    try:
        with _Executor(worker, spec, _worker_count(opts, source)) as executor:
            return _run(input_spec, out, opts, source, schema, worker, executor, started, on_progress)
    finally:
        pa.set_memory_pool(previous_pool)


def _output_names() -> list[str]:
    """Every file a run writes or deletes in its --output folder (both formats: the other one is removed)."""
    return [f"{kind}.{ext}" for kind in ("sft", "pairs") for ext in FORMATS] + ["report.json"]


def _run(input_spec, out: Path, opts: PairOptions, source, schema: str, worker: BatchWorker, executor: _Executor,
         started: float, on_progress) -> PairResult:
    total = source.count_rows(executor.count_ranges)
    layout = Layout(total, bucket_count(total), opts.shuffle_seed)
    tally = Tally()
    ext = opts.output_format
    tmp = Path(tempfile.mkdtemp(prefix=".redi-pair-", dir=out))
    sinks = {kind: BucketedSink(FileWriter(out / f"{kind}.{ext}", kind, ext), total, layout.buckets, tmp)
             for kind in ("sft", "pairs")}
    worker.set_layout(layout)

    def absorb(result) -> None:
        tally.merge(result.tally)
        sinks["sft"].add(*result.sft)
        sinks["pairs"].add(*result.pairs)

    try:
        deferred: list = []
        tasks = source.tasks(needed_columns(schema), opts.batch_rows)
        for result in executor.map(ProcessJob(task, layout) for task in tasks):
            absorb(result)
            deferred.extend(result.deferred)
            if sum(len(c.generations) for c in deferred) >= _GRADE_BATCH:
                absorb(worker.finish(_grade(deferred, opts, tally)))
                deferred = []
            if tally.counts["rows_read"] > total:
                raise UserError(f"{input_spec}: more rows than the {total} counted before reading; did it change?")
            if on_progress is not None:
                on_progress(tally.counts["rows_read"], total)
        if deferred:
            absorb(worker.finish(_grade(deferred, opts, tally)))
        if tally.counts["rows_read"] != total:
            raise UserError(f"{input_spec}: read {tally.counts['rows_read']} rows but counted {total}; "
                            "did it change?")
        # The two files are independent; their sorting, encoding and compression release the GIL.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as threads:
            for done in [threads.submit(sink.finish) for sink in sinks.values()]:
                done.result()
    except BaseException:
        for sink in sinks.values():
            try:
                sink.abort()
            except Exception:
                pass
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    other = "jsonl" if ext == "parquet" else "parquet"
    for kind in ("sft", "pairs"):  # a stale file of the other format would be read instead of this one
        (out / f"{kind}.{other}").unlink(missing_ok=True)
    report = build_report(str(input_spec), schema, opts, tally, total)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return PairResult(report, out, time.perf_counter() - started)


def build_report(input_spec: str, schema: str, opts: PairOptions, tally: Tally, total: int) -> dict:
    """report.json: counts, reasons, lists and histograms; nothing time- or machine-dependent (reruns match)."""
    counts = tally.counts
    options = asdict(opts)
    for knob in ("batch_rows", "workers"):  # speed only: outputs are identical whatever they are
        options.pop(knob)
    options["exclude_sources"] = list(opts.exclude_sources)
    options["decontaminate"] = list(opts.decontaminate)
    unit = "tokens" if opts.tokenizer else "chars"
    report = {
        "input": input_spec,
        "schema": schema,
        "correct_if": _rule_text(schema, opts.correct_if),
        "order": (f"datasets shuffle(seed={opts.shuffle_seed}) over all {total} input rows"
                  if opts.shuffle_seed is not None else "input order"),
        "options": options,
        "rows_read": counts["rows_read"],
        "rows_dropped": dict(tally.dropped),
        "sft_problems": counts["sft_problems"],
        "sft_rows": counts["sft_rows"],
        "rows_without_pair": {"no_incorrect_trace": counts["no_incorrect"], "too_long": counts["too_long_rows"]},
        "pairs": counts["pairs"],
        "pairs_dropped_too_long": counts["pairs_too_long"],
        "null_labels": counts["null_labels"],
        "length_filter": None if opts.tokenizer is None else {
            "tokenizer": opts.tokenizer, "max_prompt_tokens": opts.max_prompt_tokens,
            "max_response_tokens": opts.max_response_tokens, "applies_to": "pairs",
            "measure": "chat template tokens + 1; responses templated alone (spec 4.4)"},
        "length_histograms": {name: (tally.hist[name] if name in tally.hist else Histogram(unit)).to_dict()
                              for name in HISTOGRAMS},
        # Workers finish out of row order only across grading batches; sort so reruns are identical.
        "malformed": sorted(tally.malformed, key=lambda e: e["row"]),
        "contaminated": sorted(tally.contaminated, key=lambda e: e["row"]),
    }
    if opts.decontaminate:
        per_file = dict.fromkeys(opts.decontaminate, 0)
        for entry in tally.contaminated:
            per_file[entry["benchmark"]] = per_file.get(entry["benchmark"], 0) + 1
        report["contaminated_per_benchmark"] = per_file
    if counts["graded"]:
        report["graded"] = {"generations": counts["graded"], "format_errors": counts["graded_format_errors"],
                            "timeouts": counts["graded_timeouts"]}
    return report


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """The terminal table: (what, how many)."""
    d = report["rows_dropped"]
    rows = [("rows read", report["rows_read"])]
    rows += [(f"dropped: {k.replace('_', ' ')}", v) for k, v in d.items()]
    rows += [("SFT problems", report["sft_problems"]), ("SFT rows", report["sft_rows"]),
             ("no pair: no incorrect trace", report["rows_without_pair"]["no_incorrect_trace"]),
             ("no pair: too long", report["rows_without_pair"]["too_long"]),
             ("pairs dropped too long", report["pairs_dropped_too_long"]), ("pairs", report["pairs"])]
    if report["null_labels"]:
        rows.append(("null labels (counted false)", report["null_labels"]))
    if "graded" in report:
        rows.append(("generations graded (math-verify)", report["graded"]["generations"]))
    return [(name, f"{value:,}") for name, value in rows]
