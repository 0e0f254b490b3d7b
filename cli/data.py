"""`redi data pair`: flags -> ``redi.pairing.pipeline.PairOptions``; the work is ``redi.pairing.pipeline.pair_dataset``."""
from __future__ import annotations

from typing import List, Optional

import typer

from redi.errors import UserError


def _seed(text: str) -> Optional[int]:
    if text.strip().lower() in ("none", "off", "no"):
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--shuffle-seed {text!r}: expected an integer or 'none'") from None


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    from redi.pairing.pipeline import summary_rows

    report = result.report
    table = Table(title=f"redi data pair: {report['input']} ({report['schema']})", show_header=False)
    table.add_column("what")
    table.add_column("rows", justify="right")
    for name, value in summary_rows(report):
        table.add_row(name, value)
    console = Console()
    console.print(table)
    for entry in report["malformed"][:5]:
        console.print(f"  malformed row {entry['row']}: {entry['reason']}", markup=False, highlight=False)
    if len(report["malformed"]) > 5:
        console.print(f"  ... {len(report['malformed']) - 5} more malformed rows listed in report.json")
    if report["null_labels"]:
        console.print(f"note: {report['null_labels']:,} null labels counted as false; correct = "
                      f"{report['correct_if']}", markup=False, highlight=False)
    ext = report["options"]["output_format"]
    rate = report["rows_read"] / result.seconds if result.seconds > 0 else 0.0
    console.print(f"wrote {result.out_dir}/sft.{ext}, pairs.{ext}, report.json in {result.seconds:.1f}s "
                  f"({rate:,.0f} rows/s)", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Prepare training data from teacher traces.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("pair")
    def pair(
        input: str = typer.Argument(..., help="Teacher traces: .jsonl(.gz), .json, .parquet, a save_to_disk or data folder, or a hub name."),
        output: str = typer.Option(..., "--output", "-o", help="Folder for sft.*, pairs.* and report.json."),
        schema: Optional[str] = typer.Option(None, "--schema", help="openr1-raw | openr1-220k | flat (default: detected from the columns)."),
        split: str = typer.Option("train", "--split", help="Split of a hub dataset, DatasetDict folder or data folder."),
        correct_if: Optional[str] = typer.Option(None, "--correct-if", help="both (default: llama AND re-parsed math-verify) | any | math-verify | llama."),
        exclude_source: List[str] = typer.Option(["cn_k12"], "--exclude-source", help="Drop rows whose source equals this (repeatable; 'none' keeps all)."),
        pairs_per_problem: int = typer.Option(1, "--pairs-per-problem", help="Beyond the paper: up to N pairs per problem, (correct, not-correct) combinations chosen-major; 0 = all."),
        all_positives: bool = typer.Option(False, "--all-positives", help="Beyond the paper: SFT keeps every correct trace, not only the first."),
        require_complete: bool = typer.Option(True, "--require-complete/--no-require-complete", help="openr1-220k: a trace with is_reasoning_complete false is never correct."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder: enables the pair length filter, measured with its chat template."),
        max_prompt_tokens: int = typer.Option(800, "--max-prompt-tokens", help="Length filter: prompt limit (paper: 800)."),
        max_response_tokens: int = typer.Option(19_000, "--max-response-tokens", help="Length filter: limit for chosen and rejected each (paper: 19,000)."),
        decontaminate: List[str] = typer.Option([], "--decontaminate", help="Benchmark file (.json/.jsonl/.parquet); drop problems sharing a word n-gram with it (repeatable)."),
        ngram_size: int = typer.Option(8, "--ngram-size", help="n for --decontaminate."),
        shuffle_seed: str = typer.Option("42", "--shuffle-seed", help="Output order = datasets shuffle(seed) of the input, as the paper; 'none' keeps input order."),
        fmt: str = typer.Option("parquet", "--format", help="parquet | jsonl."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes for reading and for math-verify (default: all cores for inputs over 32 MB; 0 = none)."),
        grade_timeout: float = typer.Option(5.0, "--grade-timeout", help="Seconds per math-verify judgement."),
        force: bool = typer.Option(False, "--force", help="Write into a non-empty --output folder (replaces sft.*, pairs.*, report.json)."),
    ) -> None:
        """Teacher traces -> SFT set (first correct trace) and pairs (first correct vs first incorrect)."""
        from rich.progress import Progress

        from redi.pairing.pipeline import PairOptions, pair_dataset

        excluded = () if [s.lower() for s in exclude_source] == ["none"] else tuple(exclude_source)
        opts = PairOptions(schema=schema, split=split, correct_if=correct_if, exclude_sources=excluded,
                           pairs_per_problem=pairs_per_problem, all_positives=all_positives,
                           require_complete=require_complete, tokenizer=tokenizer,
                           max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens,
                           decontaminate=tuple(decontaminate), ngram_size=ngram_size,
                           shuffle_seed=_seed(shuffle_seed), output_format=fmt, workers=workers,
                           grade_timeout=grade_timeout)
        with Progress(transient=True) as progress:
            task = progress.add_task("pairing", total=None)

            def on_progress(done: int, total: Optional[int]) -> None:
                progress.update(task, completed=done, total=total)

            result = pair_dataset(input, output, opts,
                                  on_progress=on_progress if progress.console.is_terminal else None,
                                  force=force)
        _print_summary(result)
        report = result.report
        if not report["pairs"]:
            dropped = ", ".join(f"{k} {v}" for k, v in report["rows_dropped"].items() if v) or "none"
            raise UserError(f"no pairs came out of {input} ({report['rows_read']} rows read; dropped: {dropped}); "
                            f"see {result.out_dir}/report.json")
