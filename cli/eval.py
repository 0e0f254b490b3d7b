"""`redi eval`: sample, grade and report with the paper's protocol."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def results_table(results: dict, title: str):
    """One row per benchmark; fits an 80-column terminal (tests/test_eval.py renders it at 80)."""
    from rich import box
    from rich.table import Table

    first = next(iter(results.values()), {})
    n = first.get("n", 1)
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0),
                  caption=f"grader: {first.get('grader', '?')}; % of samples; tokens: mean per response")
    for col in ("benchmark", "problems", f"pass@1 (n={n})", f"pass@{n}", "tokens", "truncated", "format err"):
        table.add_column(col, justify="left" if col == "benchmark" else "right", no_wrap=True)
    for name, r in results.items():
        sem = "" if r["sem"] is None else f" ± {100 * r['sem']:.1f}"
        pass_n = r["pass@" + str(r["n"])]
        table.add_row(name, str(r["problems"]), f"{100 * r['pass@1']:.1f}{sem}", f"{100 * pass_n:.1f}",
                      f"{r['mean_response_tokens']:.0f}", f"{100 * r['truncation_rate']:.0f}%", str(r["format_errors"]))
    return table


def print_plan(benchmarks: List[str], settings) -> None:
    """--dry-run: each benchmark's source and problem count after --limit, and the sampling settings."""
    from redi.evaluation.pipeline import benchmark_source, load_benchmark

    for spec in benchmarks:
        name, problems = load_benchmark(spec, settings.limit)
        count = f"{len(problems)} problem" + ("" if len(problems) == 1 else "s")
        typer.echo(f"{name}: {count} from {benchmark_source(spec)}")
    typer.echo(f"{settings.samples} samples each, T {settings.temperature}, top-p {settings.top_p}, "
               f"{settings.max_new_tokens} new tokens, grader {settings.grader_name}, template {settings.template}")


def check_choices(template: str, engine: Optional[str], grader: Optional[str], samples: int, max_new_tokens: int,
                  batch_size: int) -> None:
    """The options with a fixed set of values or a floor, refused before anything loads."""
    from redi.errors import UserError
    from redi.evaluation.engines import ENGINES
    from redi.evaluation.grading import GRADERS

    if template not in ("paper", "raw"):
        raise UserError(f"--template must be paper or raw, got '{template}'")
    if engine is not None and engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    if grader is not None and grader not in GRADERS:
        raise UserError(f"--grader must be one of {', '.join(GRADERS)}, got '{grader}'")
    if samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise UserError("--samples, --max-new-tokens and --batch-size must be at least 1")


def print_results(results: dict, settings, model: str, output: str) -> None:
    from rich.console import Console

    from redi.evaluation.advice import eval_advice

    Console().print(results_table(results, f"redi eval: {model}"))
    advice = eval_advice(results, settings)
    if advice:
        typer.echo(advice)  # one line, unwrapped: the reason behind a table of format errors
    typer.echo(f"samples: {output}/samples.jsonl  results: {output}/results.json")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: Optional[str] = typer.Option(None, "--model", help="HF model directory (or hub name when online); required unless --dry-run."),
        benchmark: List[str] = typer.Option(..., "--benchmark", help="math500 | aime24 | amc23 | minerva | olympiadbench (the paper's files, shipped), hf:<hub dataset>, or a jsonl/parquet with problem and answer. Repeatable."),
        output: str = typer.Option("eval", "--output", help="Folder for samples.jsonl, results.json and settings.json."),
        engine: Optional[str] = typer.Option(None, "--engine", help="vllm | native (default: native when --backend is given, else vllm when installed, else native)."),
        backend: str = typer.Option("", "--backend", help="The native engine's backend: cpu | cuda | mlx (default: as redi train)."),
        grader: Optional[str] = typer.Option(None, "--grader", help="rllm (the paper's) | math-verify | math-verify-unboxed (an answer without \\boxed{} is read from the final text) (default: rllm with --template paper, else math-verify)."),
        tensor_parallel: int = typer.Option(1, "--tensor-parallel", help="vLLM: GPUs per model copy."),
        data_parallel: int = typer.Option(1, "--data-parallel", help="vLLM: model copies."),
        samples: int = typer.Option(16, "--samples", help="Samples per problem."),
        temperature: float = typer.Option(0.6, "--temperature"),
        top_p: float = typer.Option(0.95, "--top-p"),
        max_new_tokens: int = typer.Option(32768, "--max-new-tokens"),
        force_think: bool = typer.Option(True, "--force-think/--no-force-think", help="Open the generation with <think> (the paper's rllm setup)."),
        system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System turn (default: the Qwen-Math prompt)."),
        no_system_prompt: bool = typer.Option(False, "--no-system-prompt", help="No system turn at all."),
        template: str = typer.Option("paper", "--template", help="paper: the paper's instruction around the problem; raw: the problem alone."),
        seed: int = typer.Option(0, "--seed"),
        batch_size: int = typer.Option(64, "--batch-size", help="Native engine: sequences generated together."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Grading processes (default: all cores)."),
        limit: int = typer.Option(0, "--limit", help="Only the first N problems of each benchmark."),
        force: bool = typer.Option(False, "--force", help="Add to an --output whose recorded model or settings differ."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Resolve the benchmarks and print the plan; load no model, write nothing."),
    ) -> None:
        """Pass@1 over N samples with the paper's SEM, pass@k, mean length and truncation rate."""
        from redi.errors import Interrupted, UserError
        from redi.evaluation.pipeline import QWEN_MATH_SYSTEM, EvalSettings, count_samples, evaluate

        check_choices(template, engine, grader, samples, max_new_tokens, batch_size)
        settings = EvalSettings(samples, temperature, top_p, max_new_tokens, force_think,
                                None if no_system_prompt else (system_prompt or QWEN_MATH_SYSTEM), template, seed,
                                batch_size, workers, limit, grader, engine, tensor_parallel, data_parallel)
        if dry_run:
            print_plan(benchmark, settings)
            return
        if model is None:
            raise UserError("--model is required (only --dry-run runs without one)")
        try:
            results = evaluate(model, benchmark, output, settings, backend, force=force)
        except KeyboardInterrupt:
            kept = count_samples(Path(output) / "samples.jsonl")
            raise Interrupted(f"{kept} sample{'' if kept == 1 else 's'} so far are in {output}/samples.jsonl; "
                              "the same command resumes from them") from None
        print_results(results, settings, model, output)
