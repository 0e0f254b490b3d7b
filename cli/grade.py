"""`redi grade`: grade already generated responses (no model); the work is in redi.evaluation.grading."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from redi.cli.help import UsageCommand
from redi.atomic import write_text_atomic
from redi.errors import UserError
from redi.outputs import json_line, refuse_overwriting_inputs


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _print_table(path: Path, summary: dict, grader: str) -> None:
    from rich.console import Console
    from rich.table import Table

    n = summary["n"]
    table = Table(title=f"{path.name}: {summary['problems']} problems, {summary['samples']} samples",
                  caption=f"grader: {grader}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("pass@1 ± SEM (%)", f"{_percent(summary['pass@1'])} ± {_percent(summary['sem'])}")
    for key, value in summary.items():
        if key.startswith("pass@") and key != "pass@1":
            label = f"{key} (%)" if key == f"pass@{n}" else f"{key} (%, unbiased)"
            table.add_row(label, _percent(value))
    table.add_row("format errors", str(summary["format_errors"]))
    table.add_row("timeouts (wrong)", str(summary["timeouts"]))
    spread = summary["samples_per_problem"]
    if spread["min"] != spread["max"]:
        table.add_row("samples per problem", f"{spread['min']}-{spread['max']} (n = {n} for pass@n and SEM)")
    Console().print(table)


def register(app: typer.Typer) -> None:
    @app.command("grade", cls=UsageCommand)
    def grade(
        responses: Path = typer.Argument(..., metavar="RESPONSES", help='JSONL, one {"id", "response", "answer"} per line; '
                                                   "several lines per id are several samples."),
        json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write per-sample verdicts (JSONL)."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Grading processes (default: all cores; "
                                                                      "0 or 1: one judging process)."),
        require_boxed: bool = typer.Option(True, "--require-boxed/--no-require-boxed",
                                           help="No \\boxed{} is a format error; off: math-verify extracts."),
        require_think: bool = typer.Option(False, "--require-think",
                                           help="A response without </think> is a format error (use when the "
                                                "prompt forced <think>, as the paper's evaluation did)."),
        timeout: float = typer.Option(5.0, "--timeout", help="CPU seconds per judgement; a timeout counts wrong."),
        grader: str = typer.Option("math-verify", "--grader",
                                   help="math-verify | rllm (the paper's reward: no </think> or no \\boxed{} is a "
                                        "format error, whatever the two flags above say) | math-verify-unboxed "
                                        "(math-verify with --no-require-boxed)."),
    ) -> None:
        """Grade responses (math-verify or the paper's rllm reward): pass@1 ± SEM, pass@k and format errors."""
        from redi.evaluation.grading import GRADERS, grade_file

        if grader not in GRADERS:
            raise UserError(f"--grader must be one of {', '.join(GRADERS)}, got '{grader}'")
        if workers is not None and workers < 0:
            raise UserError(f"--workers must be 0 or more, got {workers}")
        if timeout <= 0:
            raise UserError(f"--timeout must be positive, got {timeout}")
        if output is not None:
            refuse_overwriting_inputs([responses], [output], flag="--output")
        summary, records = grade_file(responses, workers=workers, timeout=timeout, require_boxed=require_boxed,
                                      require_think=require_think, grader=grader)
        if output is not None:
            try:  # in one rename: a kill or a full disk never leaves a cut verdict file
                write_text_atomic(output, "".join(json_line(record) for record in records))
            except OSError as err:
                raise UserError(f"{output}: cannot write ({err.strerror or err})") from None
        if json_output:
            print(json.dumps({"file": str(responses), "grader": grader, **summary}))
        else:
            _print_table(responses, summary, grader)
