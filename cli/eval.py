"""`redi eval`: sample, grade and report with the paper's protocol."""
from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: str = typer.Option(..., "--model", help="HF model directory (or hub name when online)."),
        benchmark: List[str] = typer.Option(..., "--benchmark", help="math500 | aime24 | amc23 | minerva | olympiadbench, or a jsonl/parquet with problem and answer. Repeatable."),
        output: str = typer.Option("eval", "--output", help="Folder for samples.jsonl and results.json."),
        backend: str = typer.Option("", "--backend", help="cpu | cuda | mlx (default: as redi train)."),
        samples: int = typer.Option(16, "--samples", help="Samples per problem."),
        temperature: float = typer.Option(0.6, "--temperature"),
        top_p: float = typer.Option(0.95, "--top-p"),
        max_new_tokens: int = typer.Option(32768, "--max-new-tokens"),
        force_think: bool = typer.Option(True, "--force-think/--no-force-think", help="Open the generation with <think> (the paper's rllm setup)."),
        system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System turn (default: the Qwen-Math prompt)."),
        no_system_prompt: bool = typer.Option(False, "--no-system-prompt", help="No system turn at all."),
        template: str = typer.Option("paper", "--template", help="paper: the paper's instruction around the problem; raw: the problem alone."),
        seed: int = typer.Option(0, "--seed"),
        batch_size: int = typer.Option(64, "--batch-size", help="Prompts generated together."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Grading processes (default: all cores)."),
        limit: int = typer.Option(0, "--limit", help="Only the first N problems of each benchmark."),
    ) -> None:
        """Pass@1 over N samples with the paper's SEM, pass@k, mean length and truncation rate."""
        from rich.console import Console
        from rich.table import Table

        from redi.errors import Interrupted, UserError
        from redi.evaluation.pipeline import QWEN_MATH_SYSTEM, EvalSettings, evaluate

        if template not in ("paper", "raw"):
            raise UserError(f"--template must be paper or raw, got '{template}'")
        if samples < 1 or max_new_tokens < 1:
            raise UserError("--samples and --max-new-tokens must be at least 1")
        settings = EvalSettings(samples, temperature, top_p, max_new_tokens, force_think,
                                None if no_system_prompt else (system_prompt or QWEN_MATH_SYSTEM), template, seed,
                                batch_size, workers, limit)
        try:
            results = evaluate(model, benchmark, output, settings, backend)
        except KeyboardInterrupt:
            raise Interrupted(f"samples so far are in {output}/samples.jsonl; the same command resumes from them") from None
        table = Table(title=f"redi eval: {model}")
        for col in ("benchmark", "problems", f"pass@1 (n={samples})", "± SEM", f"pass@{samples}", "mean tokens",
                    "truncated", "format errors"):
            table.add_column(col, justify="right" if col != "benchmark" else "left")
        for name, r in results.items():
            sem = "-" if r["sem"] is None else f"{100 * r['sem']:.1f}"
            pass_n = r[f"pass@{r['n']}"]
            table.add_row(name, str(r["problems"]), f"{100 * r['pass@1']:.1f}", sem, f"{100 * pass_n:.1f}",
                          f"{r['mean_response_tokens']:.0f}", f"{100 * r['truncation_rate']:.0f}%", str(r["format_errors"]))
        Console().print(table)
        typer.echo(f"samples: {output}/samples.jsonl  results: {output}/results.json")
