"""`redi data pair`: flags -> ``redi.pairing.pipeline.PairOptions``; the work is ``redi.pairing.pipeline.pair_dataset``."""
from __future__ import annotations

from typing import List, Optional

import typer

from redi.cli.help import UsageCommand
from redi.errors import UserError


def _seed(text: str) -> Optional[int]:
    if text.strip().lower() in ("none", "off", "no"):
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--shuffle-seed {text!r}: expected an integer or 'none'") from None


def _summary_table(title: str, value_column: str, rows):
    """Both `redi data` summaries: a two-column table, names left, values right-aligned."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column(value_column, justify="right")
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def _print_summary(result) -> None:
    from rich.console import Console

    from redi.pairing.pipeline import summary_rows

    report = result.report
    console = Console()
    console.print(_summary_table(f"redi data pair: {report['input']} ({report['schema']})", "rows",
                                 summary_rows(report)))
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
    data_app = typer.Typer(help="Prepare training data from teacher traces.", no_args_is_help=True,
                           rich_markup_mode=None)
    app.add_typer(data_app, name="data")
    data_app.command("pair", cls=UsageCommand)(pair)
    data_app.command("generate")(generate)


def pair(
    input: str = typer.Argument(..., metavar="INPUT", help="Teacher traces: .jsonl(.gz), .json, .parquet, a save_to_disk or data folder, or a hub name."),
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
    ablation: Optional[str] = typer.Option(None, "--ablation", help="verifier-signal: the authors' ablation sets instead (mixed SFT, main and inverted pairs; docs/paper.md)."),
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
    if ablation is not None:
        return _ablation(ablation, input, output, opts, force)
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


def _ablation(name: str, input: str, output: str, opts, force: bool) -> None:
    from rich.console import Console

    from redi.pairing import ablation

    if name not in ablation.ABLATIONS:
        raise UserError(f"unknown --ablation {name!r} (choose from {', '.join(ablation.ABLATIONS)})")
    report = ablation.verifier_signal(input, output, opts, force=force)
    console = Console()
    console.print(_summary_table(f"redi data pair --ablation {name}: {input}", "rows", ablation.summary_rows(report)))
    sets = ", ".join([f"{folder}/" for folder in ablation.SETS.values()] + ["split.jsonl", "report.json"])
    console.print(f"wrote {output}: {sets}", markup=False, highlight=False)
    if not report["main"]["pairs"]:
        raise UserError(f"no pairs came out of {input} (Type A problems: {report['type_a']}); see {output}/report.json")


def generate(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model: HF model folder (or hub name when online)."),
    problems: str = typer.Option(..., "--problems", help="jsonl, parquet or datasets folder with problem and answer (or a benchmark name, as redi eval)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder for traces.jsonl (redi data pair's input) and report.json."),
    samples: int = typer.Option(4, "--samples", help="Traces per problem (open-r1's default: 4)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="vllm | native (default: vllm when it imports)."),
    backend: str = typer.Option("", "--backend", help="Native engine's backend: cpu | cuda | mlx (default as redi train)."),
    grader: str = typer.Option("math-verify", "--grader", help="math-verify | rllm | math-verify-unboxed (an answer without \\boxed{} is read from the final text)."),
    temperature: float = typer.Option(0.6, "--temperature"),
    top_p: float = typer.Option(0.95, "--top-p"),
    max_new_tokens: int = typer.Option(16384, "--max-new-tokens"),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="System turn (default: none, as OpenR1)."),
    instruction: Optional[str] = typer.Option(None, "--instruction", help="User turn with {problem} in it (default: open-r1's instruction)."),
    chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template", help="Off: the instruction text is the whole prompt (base models)."),
    force_think: bool = typer.Option(True, "--force-think/--no-force-think", help="Open each trace with <think> (DeepSeek-R1's recommendation)."),
    id_field: Optional[str] = typer.Option(None, "--id-field", help="Column with a unique problem id (default: id, else unique_id, else the row number)."),
    limit: int = typer.Option(0, "--limit", help="Only the first N problems."),
    seed: int = typer.Option(0, "--seed"),
    chunk_problems: int = typer.Option(64, "--chunk-problems", help="Problems per engine call; a finished chunk is never generated again."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Grading processes (default: all cores)."),
    force: bool = typer.Option(False, "--force", help="Resume into a folder whose settings differ."),
) -> None:
    """Teacher traces: N samples per problem, each graded, in the file redi data pair reads."""
    from redi.pairing.generate import OPENR1_INSTRUCTION, GenerateSettings

    settings = GenerateSettings(samples, temperature, top_p, max_new_tokens, system_prompt,
                                instruction or OPENR1_INSTRUCTION, chat_template, force_think, grader, engine,
                                backend, seed, chunk_problems, id_field, limit, workers)
    result = _run_generate(teacher, problems, output, settings, force)
    _print_generate_summary(result)

def _run_generate(teacher, problems, output, settings, force):
    from rich.progress import Progress

    from redi.pairing.generate import generate_traces

    with Progress(transient=True) as progress:
        task = progress.add_task("generating", total=None)
        terminal = progress.console.is_terminal

        def on_chunk(done: int, total: int) -> None:
            if terminal:
                progress.update(task, completed=done, total=total)
            else:
                typer.echo(f"generated {done}/{total} problems", err=True)

        return generate_traces(teacher, problems, output, settings, force=force, on_chunk=on_chunk)


def _print_generate_summary(result) -> None:
    from rich.console import Console

    report = result.report
    n = report["samples_per_problem"]
    rows = [("problems", report["problems"]), ("traces", report["traces"]),
            ("correct traces", report["correct_traces"]),
            *((f"problems with {k} correct", v) for k, v in report["correct_per_problem"].items()),
            ("problems that yield a pair", report["pairable_problems"]),
            (f"... with the first {max(1, n // 2)} samples only", report["pairable_by_samples"][str(max(1, n // 2))]["pairable_first_k"]),
            ("truncated", f"{100 * report['truncation_rate']:.1f}%"),
            ("tokens generated", f"{report['tokens_generated']:,}")]
    run = report.get("this_run")
    if run and run["tokens_per_second"]:
        rows += [("traces/s (this run)", f"{run['traces_per_second']:.2f}"),
                 ("tokens/s (this run)", f"{run['tokens_per_second']:,.0f}")]
    Console().print(_summary_table(f"redi data generate: {report['teacher']}", "value", rows))
    typer.echo(f"wrote {result.out_dir}/traces.jsonl and report.json; next: "
               f"redi data pair {result.out_dir}/traces.jsonl --output PAIRS_DIR")
