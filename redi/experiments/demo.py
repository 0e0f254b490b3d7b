"""The built-in demo: data -> SFT -> REDI (and a continued-SFT control) -> held-out accuracy, plots, examples.

``run_demo(cfg)`` trains through ``redi.training.api.train`` like any run, then samples every model with the backend's
``generate``: greedy and at the paper's T = 0.6 / top-p 0.95. Run folder (``cfg.output``): the usual files
of ``redi train`` (stage 2 is REDI), ``control/`` (the continued-SFT run), ``eval/<arm>.jsonl`` (every
sample, graded), ``plots/*.png``, and ``summary.json`` (the demo's summary; timings only under "timing").
"""
from __future__ import annotations

import importlib.resources
import json
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from redi.atomic import write_text_atomic
from redi.training.api import load_tokenizer, train
from redi.backend import make_backend
from redi.config import Config, continued_sft_config, load_config
from redi.experiments.demo_task import check_task
from redi.errors import UserError
from redi.evaluation.grading import last_boxed, pass_at_1, sem_paper
from redi.training.metrics import read_metrics
from redi.experiments.plots import plot_metric, plot_training_curves

ARMS = {"after_sft": "after SFT (stage 1)", "after_redi": "after REDI (stage 2)",
        "continued_sft": "continued SFT (control)"}
_COLUMN = re.compile(r"^(?:(\d)\+(\d)\+(\d)=(\d+))?>(\d+)$")


def default_config_path() -> Path:
    """The shipped recipe: inside the package (``redi.configs``) when installed, else the checkout's file."""
    try:
        packaged = importlib.resources.files("redi.configs") / "demo.yaml"
        if packaged.is_file():
            return Path(str(packaged))
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def demo_config(output: str | None = None, path: str | Path | None = None) -> Config:
    cfg = load_config(path or default_config_path())
    if output:
        cfg.output = output
    return cfg


@dataclass(frozen=True)
class EvalSettings:
    samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 128

    @classmethod
    def from_task(cls, task: dict) -> "EvalSettings":
        return cls(int(task.get("eval_samples", 4)), float(task.get("eval_temperature", 0.6)),
                   float(task.get("eval_top_p", 0.95)), int(task.get("eval_max_new_tokens", 128)))


# ------------------------------------------------------------------------------------------ reading traces


def columns_of(trace: str) -> list[tuple[bool, str]]:
    """(was a shortcut, digits written so far) for each column line of a trace, right to left."""
    out = []
    for line in trace.strip("\n").split("\n"):
        m = _COLUMN.match(line)
        if m:
            out.append((m.group(1) is None, m.group(5)))
    return out


def is_correct(trace: str, answer: str) -> bool:
    # Integer answers only: exact digits after the last \boxed{}, as math-verify would judge them, but
    # without its ~2 ms per call (the demo grades ~4,000 samples per model).
    boxed = last_boxed(trace)
    return boxed is not None and boxed.isdigit() and int(boxed) == int(answer)


def first_error(trace: str, answer: str) -> tuple[int, bool] | None:
    """(column, was it a shortcut) of the first column whose new digit is wrong; None if every digit is right."""
    true_digits = answer[::-1]
    for col, (shortcut, digits) in enumerate(columns_of(trace)):
        if col >= len(true_digits) or not digits or digits[0] != true_digits[col]:
            return col, shortcut
    return None


# ------------------------------------------------------------------------------------------ evaluation


def _generate(backend, prompts: list[list[int]], settings: EvalSettings, temperature: float, seed: int,
              eos_id: int) -> list[list[int]]:
    # Wide batches make CPU sampling of a tiny model several times faster.
    return backend.generate(prompts, max_new_tokens=settings.max_new_tokens, temperature=temperature,
                            top_p=settings.top_p, seed=seed, eos_id=eos_id, batch_size=512)


def evaluate_model(model_dir: Path, problems: list[dict], cfg: Config, settings: EvalSettings) -> dict:
    """Greedy and sampled accuracy of one model on held-out problems, plus how often it took shortcuts."""
    tokenizer = load_tokenizer(str(model_dir))
    backend = make_backend(cfg.backend, cfg.seed)
    backend.load(str(model_dir), precision=cfg.precision, lm_head_chunk=cfg.lm_head_chunk)
    prompts = [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in problems]
    eos = tokenizer.eos_token_id
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    greedy = [decode(o) for o in _generate(backend, prompts, settings, 0.0, cfg.seed, eos)]
    sampled_flat = _generate(backend, prompts * settings.samples, settings, settings.temperature, cfg.seed + 1, eos)
    n = len(problems)
    # sampled[i][j]: sample j of problem i (the batch above is sample-major).
    sampled = [[decode(sampled_flat[j * n + i]) for j in range(settings.samples)] for i in range(n)]
    greedy_scores = [[is_correct(t, p["answer"])] for t, p in zip(greedy, problems)]
    sampled_scores = [[is_correct(t, p["answer"]) for t in row] for row, p in zip(sampled, problems)]
    p_greedy = pass_at_1(greedy_scores)
    columns = [c for row in sampled for t in row for c in columns_of(t)]
    wrong = [first_error(t, p["answer"]) for row, p in zip(sampled, problems) for t in row
             if not is_correct(t, p["answer"])]
    located = [w for w in wrong if w is not None]
    return {
        "greedy_accuracy": p_greedy,
        # One sample per problem: the paper's SEM over samples is undefined, so the binomial SE over problems.
        "greedy_accuracy_se": (p_greedy * (1 - p_greedy) / n) ** 0.5,
        "sampled_accuracy": pass_at_1(sampled_scores),
        "sampled_accuracy_sem": sem_paper(sampled_scores) or 0.0,
        "shortcut_rate": sum(s for s, _ in columns) / max(1, len(columns)),
        "wrong_with_first_error_at_shortcut": sum(s for _, s in located) / max(1, len(located)),
        "traces": {"greedy": greedy, "sampled": sampled},
        "scores": {"greedy": greedy_scores, "sampled": sampled_scores},
    }


def _write_eval_file(path: Path, problems: list[dict], result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for i, p in enumerate(problems):
            row = {**p, "greedy": result["traces"]["greedy"][i], "greedy_correct": result["scores"]["greedy"][i][0],
                   "samples": result["traces"]["sampled"][i], "samples_correct": result["scores"]["sampled"][i]}
            fh.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------ the pipeline


def control_config(cfg: Config, run_dir: Path, data_dir: Path) -> Config:
    """Continued SFT (``continued_sft_config``) from the SFT checkpoint on the demo's pairs."""
    control = continued_sft_config(cfg)
    control.model = str(run_dir / "sft_final")
    control.data = str(data_dir / "pairs.jsonl")
    control.output = str(run_dir / "control")
    return control


def run_demo(cfg: Config, *, console: Console | None = None) -> dict:
    console = console or Console()
    if not (cfg.data.startswith("builtin:") or (Path(cfg.data) / "eval.jsonl").exists()):
        raise UserError(f"the demo needs held-out problems: {cfg.data}/eval.jsonl not found (use data: builtin:demo)")
    if cfg.stage != "both":
        raise UserError(f"the demo runs both stages; got stage '{cfg.stage}'")
    check_task(cfg.task)
    run_dir = Path(cfg.output)
    settings = EvalSettings.from_task(cfg.task)
    timing: dict[str, float] = {}
    started = time.time()
    main_summary = train(cfg)
    timing["train_s"] = time.time() - started
    data_dir = run_dir / "builtin-data" if cfg.data.startswith("builtin:") else Path(cfg.data)
    arms = {"after_sft": run_dir / "sft_final", "after_redi": run_dir / "final"}
    if not cfg.task.get("eval_after_sft", True):
        del arms["after_sft"]
    if cfg.task.get("control", True):
        t0 = time.time()
        train(control_config(cfg, run_dir, data_dir))
        arms["continued_sft"] = run_dir / "control" / "final"
        timing["control_s"] = time.time() - t0
    problems = [json.loads(line) for line in (data_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    problems = problems[: int(cfg.task.get("eval_problems", len(problems)))]
    results = {}
    for arm, model_dir in arms.items():
        t0 = time.time()
        with console.status(f"evaluating {ARMS[arm]} on {len(problems)} held-out problems"):
            results[arm] = evaluate_model(model_dir, problems, cfg, settings)
        _write_eval_file(run_dir / "eval" / f"{arm}.jsonl", problems, results[arm])
        timing[f"eval_{arm}_s"] = time.time() - t0

    records = read_metrics(run_dir / "metrics.jsonl")
    control_records = read_metrics(run_dir / "control" / "metrics.jsonl") if "continued_sft" in arms else []
    plots = make_plots(records, control_records, run_dir / "plots", cfg.alpha)
    info = json.loads((data_dir / "data_info.json").read_text()) if (data_dir / "data_info.json").exists() else {}
    timing["total_s"] = time.time() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    timing["cpu_s"] = usage.ru_utime + usage.ru_stime  # the process's CPU time: a load-independent cost
    summary = build_summary(cfg, main_summary, info, results, records, settings, len(problems), plots, timing)
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    print_report(console, summary, results, problems, data_dir, cfg)
    return summary


def make_plots(records: list[dict], control_records: list[dict], out: Path, alpha: float) -> list[str]:
    sft = [r for r in records if r["stage"] == "sft"]
    stage2 = {f"REDI (α={alpha:g})": [r for r in records if r["stage"] == "pairs"]}
    if control_records:
        stage2["continued SFT (control)"] = control_records
    paths = plot_training_curves(stage2, out, title_suffix="stage 2, from the SFT checkpoint")
    paths.append(plot_metric({"SFT": sft}, "loss", out / "sft_loss.png", ylabel="token-mean NLL (nats)",
                             title="Stage 1: SFT loss"))
    return [str(p.relative_to(out.parent)) for p in paths]


def build_summary(cfg: Config, main_summary: dict, info: dict, results: dict, records: list[dict],
                  settings: EvalSettings, n_problems: int, plots: list[str], timing: dict) -> dict:
    arms = {arm: {k: v for k, v in r.items() if k not in ("traces", "scores")} for arm, r in results.items()}
    last = next((r for r in reversed(records) if r["stage"] == "pairs"), {})
    summary = {
        "task": "demo",
        "seed": cfg.seed,
        "backend": main_summary.get("backend"),
        "parameters": main_summary.get("parameters"),
        "objective": main_summary.get("objective"),
        "alpha": cfg.alpha,
        "steps": {"sft": cfg.sft.max_steps, "pairs": cfg.pairs.max_steps},
        "collapse_warnings": main_summary.get("collapse_warnings", []),
        "final_model": "final",  # relative to the run folder; sft_final/ and control/final/ beside it
        "data_report": {stage: {k: v for k, v in report.items() if k in ("rows", "kept", "truncated", "dropped")}
                        for stage, report in main_summary.get("data", {}).items()},
        "data": {k: info.get(k) for k in ("problems", "sft_rows", "pairs", "eval_problems", "unsolved")},
        "eval": {"problems": n_problems, "samples": settings.samples, "temperature": settings.temperature,
                 "top_p": settings.top_p, "max_new_tokens": settings.max_new_tokens},
        "results": arms,
        "stage2_final_logps": {k: last.get(k) for k in ("logps/chosen_normalized", "logps/rejected_normalized")},
        "plots": plots,
    }
    if "continued_sft" in arms:
        summary["redi_minus_continued_sft"] = {
            key: arms["after_redi"][key] - arms["continued_sft"][key] for key in ("greedy_accuracy", "sampled_accuracy")
        }
    timing["train_wall_time_s"] = main_summary.get("wall_time_s", 0.0)
    summary["timing"] = {k: round(v, 1) for k, v in timing.items()}  # the only run-to-run varying part
    return summary


# ------------------------------------------------------------------------------------------ the printout


def _pct(x: float, err: float) -> str:
    return f"{100 * x:5.1f} ± {100 * err:.1f}"


def print_report(console: Console, summary: dict, results: dict, problems: list[dict], data_dir: Path,
                 cfg: Config) -> None:
    ev = summary["eval"]
    table = Table(title=f"Held-out accuracy, {ev['problems']} problems, seed {summary['seed']}",
                  caption=f"greedy: ± SE over problems; T={ev['temperature']:g} (top-p {ev['top_p']:g}): mean of "
                          f"{ev['samples']} samples ± SEM over them; shortcuts: share of columns written as "
                          "shortcuts in the samples")
    for name in ("model", "greedy %", f"T={ev['temperature']:g} %", "shortcuts %"):
        table.add_column(name, justify="left" if name == "model" else "right")
    for arm, r in summary["results"].items():
        table.add_row(ARMS[arm], _pct(r["greedy_accuracy"], r["greedy_accuracy_se"]),
                      _pct(r["sampled_accuracy"], r["sampled_accuracy_sem"]), f"{100 * r['shortcut_rate']:.1f}")
    console.print(table)
    print_examples(console, results, problems, data_dir)
    console.print(honest_reading(summary))
    console.print(f"Run folder: {cfg.output} (summary.json, plots/, eval/; final/ is the REDI model). "
                  f"Total {summary['timing']['total_s']:.0f} s.")


def print_examples(console: Console, results: dict, problems: list[dict], data_dir: Path) -> None:
    pair = json.loads((data_dir / "pairs.jsonl").open().readline())
    console.rule("A training pair: the teacher's first correct and first wrong trace")
    console.print(f"[bold]{pair['prompt']}[/]\n[green]chosen[/]{pair['chosen']}\n[red]rejected[/]{pair['rejected']}",
                  markup=True, highlight=False)
    if "after_sft" not in results:
        return
    sft, redi = results["after_sft"], results["after_redi"]
    for i, p in enumerate(problems):
        for j, trace in enumerate(sft["traces"]["sampled"][i]):
            error = first_error(trace, p["answer"])
            after = redi["traces"]["sampled"][i][j]
            if (error and error[1] and redi["scores"]["sampled"][i][j]
                    and error[0] < len(columns_of(after)) and not columns_of(after)[error[0]][0]):
                console.rule(f"Held-out {p['prompt']} (answer {p['answer']}), sample {j} at T=0.6: "
                             "REDI avoided a shortcut error")
                console.print(f"[red]after SFT[/] (shortcut at column {error[0] + 1} goes wrong){trace}\n"
                              f"[green]after REDI[/] (writes that column out){after}", highlight=False)
                return
    console.print("(no held-out sample where REDI fixed an SFT shortcut error at the same sample index)")


def _compare(diff: float, noise: float) -> str:
    # Two standard errors of the difference: below that, one seed cannot tell the arms apart.
    if abs(diff) <= 2 * noise:
        return f"{100 * diff:+.1f} points (within noise, ±{200 * noise:.1f})"
    return f"{100 * diff:+.1f} points (beyond noise, ±{200 * noise:.1f})"


def honest_reading(summary: dict) -> str:
    r = summary["results"]
    lines = ["", "[bold]What this run shows, and what it does not[/]"]
    if "continued_sft" in r:
        a, b = r["after_redi"], r["continued_sft"]
        noise_s = (a["sampled_accuracy_sem"] ** 2 + b["sampled_accuracy_sem"] ** 2) ** 0.5
        noise_g = (a["greedy_accuracy_se"] ** 2 + b["greedy_accuracy_se"] ** 2) ** 0.5
        lines.append(
            "- REDI against continued SFT (same steps and batches of the same chosen traces, no negatives): "
            f"at T={summary['eval']['temperature']:g} {_compare(a['sampled_accuracy'] - b['sampled_accuracy'], noise_s)}; "
            f"greedy {_compare(a['greedy_accuracy'] - b['greedy_accuracy'], noise_g)}.")
    if "after_sft" in r:
        lines.append(
            f"- Shortcut columns in the student's own samples: {100 * r['after_sft']['shortcut_rate']:.1f}% after "
            f"SFT, {100 * r['after_redi']['shortcut_rate']:.1f}% after REDI. The teacher's negatives are mostly "
            "shortcut errors, so avoiding shortcuts is what they can teach.")
    lines += [
        "- The task is built so that the negatives hold a lesson the student needs: a risky shortcut it copies "
        "from the positives. With random slips as the teacher's errors instead, REDI made this student 20-25 "
        "points worse (docs/demo.md). So the size of the effect is a property of this task.",
        "- One seed of one tiny model: seeds differ by many points (docs/demo.md has four). It says nothing "
        "about long reasoning traces, the paper's benchmarks, REDI against DPO or SimPO (`redi compare`), or "
        "stability at the paper's scale.",
    ]
    return "\n".join(lines)
