"""Answer extraction and math-verify equivalence in worker processes (spec §5.5); the paper's metrics are in
``scores.py`` and the worker pool in ``workers.py``.

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
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

# Callers (redi eval, data pairing, the demo) read the metrics and the worker pool through this module.
from redi.evaluation.scores import (pass_at_1, pass_at_k, pass_at_k_unbiased, per_index_accuracies,  # noqa: F401
                                    reported_ks, sem_paper, summarize)
from redi.evaluation.workers import (WORKER_EXTRA_MEMORY, _ItemTimeout, _time_limit, run_in_judge_process,  # noqa: F401
                                    run_in_workers)


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
    except (_ItemTimeout, MemoryError):  # out of CPU time or of the judging process's memory: a timeout
        return False, True, extracted
    except Exception:  # a parser crash on odd LaTeX is a wrong answer, not a failed run
        return False, False, extracted


# --------------------------------------------------------------------------------------------- public API


def grade_response(response: str, answer, *, require_boxed: bool = True, require_think: bool = False,
                   timeout: float | None = 5.0, grader: str = "math-verify") -> Verdict:
    """Grade one response (in the judging process, under the workers' limits)."""
    return grade_many([response], [answer], workers=0, timeout=timeout, require_boxed=require_boxed,
                      require_think=require_think, grader=grader)[0]


# Below this many distinct judgements, starting a pool (~1 s of imports) costs more than it saves: they go
# to the one long-lived judging process instead.
_IN_ONE_PROCESS_BELOW = 64


# math-verify-unboxed: math-verify, but a response without \boxed{} is graded on its final text (math-verify finds
# the answer itself) instead of being a format error: for models that never box (SmolLM2-135M-Instruct).
UNBOXED = "math-verify-unboxed"
GRADERS = ("math-verify", "rllm", UNBOXED)


def _judge_rllm(prediction: str, golds: tuple[str, ...], timeout: float | None, _whole_text: bool):
    """The paper's rllm reward (redi.evaluation.rllm_grader) under this process's CPU-time limit."""
    from redi.evaluation import rllm_grader

    try:
        with _time_limit(timeout):
            return rllm_grader.judge(prediction, golds), False, prediction
    except (_ItemTimeout, MemoryError):
        return False, True, prediction
    except (Exception, RecursionError):  # sympy on odd input: a wrong answer, not a failed run
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


def _judge_all(judge, items: list[tuple], workers: int | None, timeout: float | None) -> list:
    """Judge items in separate processes with memory and CPU limits: a pool for many on several cores, else
    the one judging process. Never in this process, except inside a daemonic process, which may not start
    children (the CPU limit still holds there, and its own parent's limits)."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if multiprocessing.current_process().daemon:
        return [judge(*item) for item in items]
    # Wall clock, generous: the CPU limit stops slow judgements, this only catches real hangs and crashes.
    hard_limit = 4 * (timeout or 60.0) + 60.0
    if workers <= 1 or len(items) < _IN_ONE_PROCESS_BELOW:
        return run_in_judge_process(judge, items, hard_limit=hard_limit, on_hang=(False, True, None))
    return run_in_workers(judge, items, workers=workers, hard_limit=hard_limit, on_hang=(False, True, None))


def grade_many(responses: Sequence[str], answers: Sequence, *, workers: int | None = None,
               timeout: float | None = 5.0, require_boxed: bool = True, require_think: bool = False,
               grader: str = "math-verify") -> list[Verdict]:
    """Grade many responses; ``workers=None`` uses every core, 0 or 1 one separate judging process.

    ``grader``: "math-verify" (the default everywhere but ``redi eval --template paper``), UNBOXED (math-verify
    with ``require_boxed=False``) or "rllm", the
    paper's reward (redi.evaluation.rllm_grader; ``require_boxed``/``require_think`` are then rllm's own
    rules: always). rllm's sympy path only ever runs in worker processes with CPU-time and memory limits.
    Identical (answer, gold) pairs are judged once: samples of one problem often agree, and both graders are
    deterministic. A judgement that needs more than ``timeout`` CPU seconds (user + system), or more memory
    than the judging process may hold (WORKER_EXTRA_MEMORY), counts as wrong (timed_out).
    """
    if grader not in GRADERS:
        raise ValueError(f"unknown grader {grader!r}; valid: {', '.join(GRADERS)}")
    if grader == UNBOXED:
        grader, require_boxed = "math-verify", False
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
        for i, value in zip(rest, _judge_all(_judge_rllm, [items[i] for i in rest], workers, timeout)):
            judged[i] = value
    else:
        judged = _judge_all(_judge, items, workers, timeout)

    for key, (correct, timed_out, extracted) in zip(keys, judged):
        # In fallback mode "math-verify found nothing" is the format error; a timeout is just wrong.
        format_error = key[2] and extracted is None and not timed_out
        for index in tasks[key]:
            verdicts[index] = Verdict(correct=correct, format_error=format_error, extracted=extracted,
                                      timed_out=timed_out)
    return verdicts  # type: ignore[return-value]


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
