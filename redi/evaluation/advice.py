"""One line under `redi eval`'s table when the run could not grade what the model wrote (issue 23).

Two causes, checked over all samples of all benchmarks together:

- the model does not think: 90% or more of the samples never write ``</think>`` while this run requires it.
  ``--force-think`` (the default) makes a missing ``</think>`` a format error (rllm's rule for a forced
  ``<think>``), and the rllm grader (the default with ``--template paper``) grades only the text after
  ``</think>`` whatever the prompt was. So the fix is ``--no-force-think`` and, with rllm,
  ``--grader math-verify`` (``--template raw`` also selects math-verify, but drops the paper's instruction).
- no answer can be extracted: 90% or more of the samples are format errors for another reason. rllm and
  math-verify read only the last ``\\boxed{}``; the paper's template asks for one (``--template paper``), ``raw``
  does not, and ``--grader math-verify-unboxed`` lets math-verify find the answer in the final text.
"""
from __future__ import annotations

from typing import Any

from redi.evaluation.grading import UNBOXED

THINK_END = "</think>"
SHARE = 0.9  # the share of samples at which the pattern is the model's, not a few bad samples


def missing_think(responses: list[str]) -> int:
    """How many responses never close a thinking block (counted into each benchmark's results)."""
    return sum(THINK_END not in r for r in responses)


def _think_flags(settings: Any) -> list[str]:
    flags = ["--no-force-think"] if settings.force_think else []
    if settings.grader_name == "rllm":
        flags.append("--grader math-verify")
    return flags


def _answer_hint(settings: Any) -> str:
    if settings.grader_name == UNBOXED:
        return "math-verify found no answer in their final text either"
    ask = "--template paper asks the model for one" if settings.template == "raw" else \
        "the model ignores the paper's instruction to write one"
    return f"{settings.grader_name} reads only the last \\boxed{{}} ({ask}); --grader {UNBOXED} reads the final text"


def eval_advice(results: dict[str, dict], settings: Any) -> str | None:
    """The line to print under the results table, or None when the samples could be graded.

    ``results``: `redi eval`'s per-benchmark metrics (with ``missing_think``); ``settings``: its EvalSettings.
    """
    samples = sum(r["samples"] for r in results.values())
    if not samples:
        return None
    unthinking = sum(r.get("missing_think", 0) for r in results.values()) / samples
    unanswered = sum(r["format_errors"] for r in results.values()) / samples
    flags = _think_flags(settings)
    if unthinking >= SHARE and flags:
        why = " (rllm grades only the text after </think>)" if settings.grader_name == "rllm" else ""
        return (f"note: {100 * unthinking:.0f}% of samples never write {THINK_END}, which this run requires: the "
                f"model does not think. Rerun with {' '.join(flags)}{why}.")
    if unanswered >= SHARE:
        return f"note: {100 * unanswered:.0f}% of samples give no answer the grader can read; {_answer_hint(settings)}."
    return None
