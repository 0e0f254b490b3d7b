"""Answer extraction, math-verify equivalence in worker processes, and the paper's metrics (spec §5.3, §5.5).

Core module: no torch, no mlx. Used by `redi grade`, `redi eval`, `redi compare` and the data-pairing code.

Rules (spec §5.5, pitfall 13):
- Text before the first ``</think>`` is never graded; a ``<think>`` that is never closed is a format error
  (a truncated generation scores 0). With ``require_think=True`` a missing ``</think>`` is a format error even
  without an opening tag, which is rllm's rule for prompts that force ``<think>`` (the tag is then in the prompt).
- The answer is the last ``\\boxed{...}`` (balanced braces); no box is a format error unless
  ``require_boxed=False``, which lets math-verify find an answer in the final text itself.
- Gold and prediction are both presented to math-verify as ``\\boxed{...}``: that form parses the benchmarks'
  golds correctly in 1,559 of 1,560 cases (platform notes) and keeps math-verify from picking up stray numbers.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal


@dataclass
class Verdict:
    correct: bool
    format_error: bool
    extracted: str | None
    timed_out: bool = False


# ----------------------------------------------------------------------------------------------- extraction


def final_answer_text(response: str, *, require_think: bool = False) -> str | None:
    """The part of a response that may hold the answer, or None when the thinking block never closed."""
    close = response.find("</think>")
    if close >= 0:
        return response[close + len("</think>"):]
    if require_think or "<think>" in response:
        return None
    return response


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``; None if there is none or its braces never close (truncated)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    i = start + len("\\boxed")
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped brace (\{ \}) is a literal set brace in LaTeX, not a group delimiter
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{"): i]
        i += 1
    return None


def gold_latex(answer) -> tuple[str, ...]:
    """Every acceptable answer as a LaTeX string; AMC's float golds (142.0) become integers (142)."""
    golds = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    if not golds:
        raise ValueError("empty list of acceptable answers")
    out = []
    for gold in golds:
        if isinstance(gold, bool) or gold is None:
            raise ValueError(f"answer must be a string, a number or a list of them, got {gold!r}")
        if isinstance(gold, int):
            out.append(str(gold))
        elif isinstance(gold, float):
            if not math.isfinite(gold):
                out.append(str(gold))
            elif gold.is_integer():
                out.append(str(int(gold)))
            else:
                # repr gives the shortest round-trip digits; Decimal avoids scientific notation (1e-05).
                out.append(format(Decimal(repr(gold)), "f"))
        else:
            text = str(gold).strip()
            text = last_boxed(text) or text  # some datasets store the whole boxed solution line
            if len(text) >= 2 and text[0] == "$" and text[-1] == "$":
                text = text.strip("$").strip()
            out.append(text)
    return tuple(out)


# ------------------------------------------------------------------------------------------- equivalence


class _ItemTimeout(BaseException):
    # BaseException on purpose: math-verify and sympy catch Exception broadly and would otherwise swallow the
    # timeout and keep computing with no limit left.
    pass


def _raise_timeout(signum, frame):
    raise _ItemTimeout()


@contextmanager
def _time_limit(cpu_seconds: float | None):
    """Limit on this process's CPU time, not wall time, so that a busy machine (say, generation running beside
    the grader) cannot turn right answers into timeouts and a regrade always reproduces the first grade.
    Signals reach only the main thread (and Windows has no SIGVTALRM), so elsewhere it runs unbounded."""
    if (not cpu_seconds or cpu_seconds <= 0 or not hasattr(signal, "SIGVTALRM")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    previous = signal.signal(signal.SIGVTALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_VIRTUAL, cpu_seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


_GOLD_CACHE: dict[str, list] = {}
_WARM = False


def _math_verify():
    global _WARM
    import math_verify.grader
    import math_verify.parser

    parse, verify = math_verify.parser.parse, math_verify.grader.verify
    if not _WARM:
        # We disable math-verify's own alarms (whole seconds, wall clock, and they cancel ours), so silence its
        # one-time warning that nothing bounds the time: _time_limit does.
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        # The first parses load the LaTeX grammar and sympy submodules (~0.3 CPU s); done here, outside the
        # limit, so the first judgement of a process is not the one that times out.
        for latex in ("\\boxed{\\frac{1}{2}}", "\\boxed{[1, 2)}", "\\boxed{\\{1, 2\\}}", "\\boxed{x=2\\sqrt{3}}"):
            verify(parse(latex, parsing_timeout=None), parse(latex, parsing_timeout=None), timeout_seconds=None)
        _WARM = True
    return parse, verify


def _judge(prediction: str, golds: tuple[str, ...], timeout: float | None, whole_text: bool):
    """(correct, timed_out, extracted). ``whole_text``: let math-verify find the answer itself."""
    parse, verify = _math_verify()
    extracted = None if whole_text else prediction
    try:
        with _time_limit(timeout):
            target = parse(prediction if whole_text else f"\\boxed{{{prediction}}}", parsing_timeout=None)
            if whole_text and target:
                extracted = str(target[-1])  # math-verify returns [sympy object, matched string]
            if not target:
                return False, False, extracted
            for gold in golds:
                if gold not in _GOLD_CACHE:
                    if len(_GOLD_CACHE) > 50_000:
                        _GOLD_CACHE.clear()
                    _GOLD_CACHE[gold] = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
                if verify(_GOLD_CACHE[gold], target, timeout_seconds=None):
                    return True, False, extracted
            return False, False, extracted
    except _ItemTimeout:
        return False, True, extracted
    except Exception:  # a parser crash on odd LaTeX is a wrong answer, not a failed run
        return False, False, extracted


# ----------------------------------------------------------------------------------------- worker processes

_STARTED: object = None  # shared array in each worker: task start time, -1 once done, 0 before it starts


# A judgement may allocate this much beyond what the worker holds after its imports; more is a MemoryError,
# which counts as a wrong answer (sympy on adversarial model output can otherwise eat the machine).
WORKER_EXTRA_MEMORY = 2 << 30


def _limit_memory(extra: int) -> None:
    try:
        import resource

        with open("/proc/self/statm") as handle:
            size = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):  # not Linux: the CPU-time limit still bounds each judgement
        pass


def _init_worker(started) -> None:
    global _STARTED
    _STARTED = started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    _limit_memory(WORKER_EXTRA_MEMORY)


def _run_chunk(item_fn, chunk):
    results = []
    for index, args in chunk:
        _STARTED[index] = time.time()
        results.append((index, item_fn(*args)))
        _STARTED[index] = -1.0
    return results


def _start_method() -> str:
    # Not fork: the caller may hold threads (torch, tokenizers) and fork would copy their locks mid-state.
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def run_in_workers(item_fn, items: list[tuple], *, workers: int, hard_limit: float, on_hang,
                   startup_limit: float = 120.0):
    """``[item_fn(*args) for args in items]`` in worker processes, in order, chunked to keep IPC per chunk.

    An item still running ``hard_limit`` seconds after it started (a hang the in-worker alarm cannot interrupt,
    or a worker that died) gets ``on_hang`` as its result; the pool is killed and the unfinished rest re-run.
    Workers that start no item within ``startup_limit`` seconds (multiprocessing re-spawns workers that die at
    import, e.g. when ``__main__`` cannot be re-imported) raise RuntimeError instead of waiting forever.
    """
    import numpy as np

    results: dict[int, object] = {}
    ctx = multiprocessing.get_context(_start_method())
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["redi.evaluation.grading", "redi.evaluation.rllm_grader", "math_verify"])
    shared = ctx.RawArray("d", len(items))
    started = np.frombuffer(shared, dtype=np.float64)
    todo = np.ones(len(items), dtype=bool)
    while todo.any():
        remaining = np.flatnonzero(todo).tolist()
        size = max(1, min(256, math.ceil(len(remaining) / (workers * 4))))
        chunks = [[(i, items[i]) for i in remaining[s:s + size]] for s in range(0, len(remaining), size)]
        hung = np.zeros(0, dtype=np.int64)
        pool_start = time.time()
        with ctx.Pool(min(workers, len(chunks)), initializer=_init_worker, initargs=(shared,)) as pool:
            pending = [pool.apply_async(_run_chunk, (item_fn, chunk)) for chunk in chunks]
            while pending and not len(hung):
                pending[0].wait(0.05)
                still = []
                for result in pending:
                    if result.ready():
                        for index, value in result.get():
                            results[index] = value
                            todo[index] = False
                    else:
                        still.append(result)
                pending = still
                # One snapshot: workers keep writing, and an item that finishes between two reads (start time,
                # then -1) would look as if it started long ago.
                now, snapshot = time.time(), started.copy()
                hung = np.flatnonzero(todo & (snapshot > 0) & (now - snapshot > hard_limit))
                if pending and now - pool_start > startup_limit and not (todo & (snapshot != 0)).any():
                    pool.terminate()
                    raise RuntimeError("grading worker processes did not start; if this runs from stdin or "
                                       "a notebook, run it from a script file (multiprocessing re-imports it)")
            pool.terminate()
        for index in hung.tolist():
            results[index] = on_hang
            todo[index] = False
        started[todo] = 0.0  # results of a killed chunk are lost; those items run again
    return [results[i] for i in range(len(items))]


# --------------------------------------------------------------------------------------------- public API


def grade_response(response: str, answer, *, require_boxed: bool = True, require_think: bool = False,
                   timeout: float | None = 5.0, grader: str = "math-verify") -> Verdict:
    """Grade one response in this process (the per-item time limit needs the main thread); rllm's sympy path
    still runs in a worker process."""
    return grade_many([response], [answer], workers=0, timeout=timeout, require_boxed=require_boxed,
                      require_think=require_think, grader=grader)[0]


# Below this many distinct judgements, starting workers (~1 s of imports) costs more than it saves.
_IN_PROCESS_BELOW = 64


GRADERS = ("math-verify", "rllm")


def _judge_rllm(prediction: str, golds: tuple[str, ...], timeout: float | None, _whole_text: bool):
    """The paper's rllm reward (redi.evaluation.rllm_grader) under this process's CPU-time limit."""
    from redi.evaluation import rllm_grader

    try:
        with _time_limit(timeout):
            return rllm_grader.judge(prediction, golds), False, prediction
    except _ItemTimeout:
        return False, True, prediction
    except (Exception, MemoryError, RecursionError):  # sympy on odd input: a wrong answer, not a failed run
        return False, False, prediction


def _rllm_task(response: str, answer) -> tuple | None:
    from redi.evaluation import rllm_grader

    solution = rllm_grader.solution_text(response)
    boxed = None if solution is None else rllm_grader.boxed_answer(solution)
    return None if boxed is None else (boxed, tuple(rllm_grader.rllm_golds(answer)), False)


def _math_verify_task(response: str, answer, require_boxed: bool, require_think: bool) -> tuple | None:
    golds = gold_latex(answer)
    final = final_answer_text(response, require_think=require_think)
    boxed = None if final is None else last_boxed(final)
    if final is None or (boxed is None and require_boxed):
        return None
    return (final, golds, True) if boxed is None else (boxed, golds, False)


def _judge_all(judge, items: list[tuple], workers: int | None, timeout: float | None, isolate: bool) -> list:
    """Judge items in this process or in worker processes. ``isolate``: never in this process (model output
    reaching ``eval``), except inside a daemonic process, which may not start children (the allow-list and
    the CPU limit still hold there)."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    on_main = threading.current_thread() is threading.main_thread()
    in_daemon = multiprocessing.current_process().daemon
    if isolate and not in_daemon and items:
        workers = max(1, workers)
    elif workers <= 1 or in_daemon or (on_main and len(items) < _IN_PROCESS_BELOW):
        return [judge(*item) for item in items]
    # Wall clock, generous: the CPU limit stops slow judgements, this only catches real hangs and crashes.
    hard_limit = 4 * (timeout or 60.0) + 60.0
    return run_in_workers(judge, items, workers=workers, hard_limit=hard_limit, on_hang=(False, True, None))


def grade_many(responses: Sequence[str], answers: Sequence, *, workers: int | None = None,
               timeout: float | None = 5.0, require_boxed: bool = True, require_think: bool = False,
               grader: str = "math-verify") -> list[Verdict]:
    """Grade many responses; ``workers=None`` uses every core, 0 or 1 grades in this process.

    ``grader``: "math-verify" (the default everywhere but ``redi eval --template paper``) or "rllm", the
    paper's reward (redi.evaluation.rllm_grader; ``require_boxed``/``require_think`` are then rllm's own
    rules: always). rllm's sympy path only ever runs in worker processes with CPU-time and memory limits.
    Identical (answer, gold) pairs are judged once: samples of one problem often agree, and both graders are
    deterministic. A judgement that needs more than ``timeout`` CPU seconds counts as wrong (timed_out).
    """
    if grader not in GRADERS:
        raise ValueError(f"unknown grader {grader!r}; valid: {', '.join(GRADERS)}")
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    verdicts: list[Verdict | None] = [None] * len(responses)
    tasks: dict[tuple, list[int]] = {}
    for index, (response, answer) in enumerate(zip(responses, answers)):
        key = (_rllm_task(response, answer) if grader == "rllm"
               else _math_verify_task(response, answer, require_boxed, require_think))
        if key is None:
            verdicts[index] = Verdict(correct=False, format_error=True, extracted=None)
        else:
            tasks.setdefault(key, []).append(index)

    # Sorting by gold keeps one problem's samples in one chunk, so each worker parses that gold once.
    keys = sorted(tasks, key=lambda key: key[1])
    items = [(prediction, golds, timeout, whole_text) for prediction, golds, whole_text in keys]
    judged = [None] * len(items)
    if grader == "rllm":
        from redi.evaluation.rllm_grader import mathd_equal

        # The string rule needs no parser: judged here, so only candidates for sympy go to the workers.
        for i, (prediction, golds, _, _) in enumerate(items):
            if any(mathd_equal(prediction, gold) for gold in golds):
                judged[i] = (True, False, prediction)
        rest = [i for i, v in enumerate(judged) if v is None]
        for i, value in zip(rest, _judge_all(_judge_rllm, [items[i] for i in rest], workers, timeout, True)):
            judged[i] = value
    else:
        judged = _judge_all(_judge, items, workers, timeout, False)

    for key, (correct, timed_out, extracted) in zip(keys, judged):
        # In fallback mode "math-verify found nothing" is the format error; a timeout is just wrong.
        format_error = key[2] and extracted is None and not timed_out
        for index in tasks[key]:
            verdicts[index] = Verdict(correct=correct, format_error=format_error, extracted=extracted,
                                      timed_out=timed_out)
    return verdicts  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------- metrics
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


# ------------------------------------------------------------------------------------ responses files (CLI)
# A bad line is fatal, with its line number: metrics computed over a silently shortened file would look
# valid and be wrong. Blank lines carry nothing and are skipped.


def read_responses(path) -> list[dict]:
    """Lines of ``{"id", "response", "answer"[, "sample"]}`` with ``sample`` filled in and ``line`` added."""
    import json

    from redi.errors import UserError

    try:
        handle = open(path, "rb")  # bytes: a non-UTF-8 line is named like any bad line, not a traceback
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    rows, seen, next_sample = [], set(), {}
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
            missing = [key for key in ("id", "response", "answer") if key not in record]
            if missing:
                raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
            problem, response = record["id"], record["response"]
            if not isinstance(problem, (str, int)) or isinstance(problem, bool):
                raise UserError(f"{where}: id must be a string or an integer, got {problem!r}")
            if not isinstance(response, str):
                raise UserError(f"{where}: response must be a string, got {type(response).__name__}")
            try:
                gold_latex(record["answer"])
            except ValueError as err:
                raise UserError(f"{where}: bad answer: {err}") from None
            sample = record.get("sample", next_sample.get(problem, 0))
            if not isinstance(sample, int) or isinstance(sample, bool) or sample < 0:
                raise UserError(f"{where}: sample must be a non-negative integer, got {sample!r}")
            if (problem, sample) in seen:
                raise UserError(f"{where}: id {problem!r} sample {sample} appears twice")
            seen.add((problem, sample))
            next_sample[problem] = max(next_sample.get(problem, 0), sample + 1)
            rows.append({"id": problem, "sample": sample, "response": response, "answer": record["answer"],
                         "line": line_no})
    if not rows:
        raise UserError(f"{path}: no responses in the file")
    return rows


def summarize_verdicts(rows: Sequence[dict], verdicts: Sequence[Verdict]) -> dict:
    """Group samples by id (ordered by sample index) and compute every metric."""
    by_problem: dict = {}
    for row, verdict in zip(rows, verdicts):
        by_problem.setdefault(row["id"], []).append((row["sample"], verdict.correct))
    scores = [[correct for _, correct in sorted(samples)] for samples in by_problem.values()]
    return summarize(scores, format_errors=sum(v.format_error for v in verdicts),
                     timeouts=sum(v.timed_out for v in verdicts))


def grade_file(path, *, workers: int | None = None, timeout: float | None = 5.0, require_boxed: bool = True,
               require_think: bool = False, grader: str = "math-verify") -> tuple[dict, list[dict]]:
    """Grade a responses jsonl: (summary, one verdict record per sample in file order)."""
    rows = read_responses(path)
    verdicts = grade_many([row["response"] for row in rows], [row["answer"] for row in rows], workers=workers,
                          timeout=timeout, require_boxed=require_boxed, require_think=require_think, grader=grader)
    records = [{"id": row["id"], "sample": row["sample"], "line": row["line"], "correct": v.correct,
                "format_error": v.format_error, "timed_out": v.timed_out, "extracted": v.extracted}
               for row, v in zip(rows, verdicts)]
    return summarize_verdicts(rows, verdicts), records
