"""`redi compare` driver and its report: the table (md, csv, json), the plots, the printed summary."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from redi.experiments.compare import CompareConfig, load_compare_config, make_evaluator, run_arm, sft_checkpoint
from redi.training.metrics import read_metrics
from redi.experiments.plots import plot_logps, plot_metric

COLUMNS = ["arm", "objective", "hyperparameters", "seeds", "final accuracy", "peak accuracy", "peak step",
           "final chosen LogPS", "final rejected LogPS", "max update norm", "collapse", "wall time (s)"]


def _mean_std(values: list[float], pct: bool = True, digits: int = 1) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    scale = 100 if pct else 1
    mean = scale * float(np.mean(vals))
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * float(np.std(vals, ddof=1)):.{digits}f}"


def table_rows(cc: CompareConfig, results: dict[str, list[dict]]) -> list[dict]:
    """One row per arm. One seed: accuracy ± the paper's SEM over samples; several: mean ± std over seeds."""
    rows = []
    for arm in cc.arms:
        rs = results[arm.name]
        hyper = ", ".join([f"lr={arm.learning_rate:g}"] + [f"{k}={v:g}" for k, v in arm.params.items()])
        if len(rs) == 1:
            r = rs[0]
            final = f"{100 * r['final_accuracy']:.1f} ± {100 * r['final_sem']:.1f}"
            peak = f"{100 * r['peak_accuracy']:.1f} ± {100 * r['peak_sem']:.1f}"
        else:
            final = _mean_std([r["final_accuracy"] for r in rs])
            peak = _mean_std([r["peak_accuracy"] for r in rs])
        collapsed = sum(r["collapse"] for r in rs)
        rows.append({
            "arm": arm.name, "objective": arm.objective, "hyperparameters": hyper, "seeds": len(rs),
            "final accuracy": final, "peak accuracy": peak,
            "peak step": ", ".join(str(r["peak_step"]) for r in rs),
            "final chosen LogPS": _mean_std([r["final_chosen_logps"] for r in rs], pct=False, digits=3),
            "final rejected LogPS": _mean_std([r["final_rejected_logps"] for r in rs], pct=False, digits=3),
            "max update norm": _mean_std([r["max_update_norm"] for r in rs], pct=False, digits=4),
            "collapse": f"{'yes' if collapsed else 'no'} ({collapsed}/{len(rs)})",
            "wall time (s)": f"{sum(r['wall_time_s'] for r in rs):.0f}",
        })
    return rows


def write_tables(out: Path, rows: list[dict], results: dict, cc: CompareConfig) -> None:
    with (out / "compare.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# redi compare", "",
             f"Stage 2 from one SFT checkpoint; {cc.seeds} seed(s) per arm; evaluation every {cc.eval_every} steps. "
             "Accuracy in %: one seed shows ± the paper's SEM over samples, several show mean ± std over seeds. "
             "Collapse: the alarm of redi/training/guards.py (both LogPS at least 0.1 nats/token below and twice their start).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "Plots: " + ", ".join(f"[{p}](plots/{p})" for p in
                                      ("accuracy.png", "chosen_logps.png", "rejected_logps.png", "update_norm.png"))]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps(results, indent=2))


def _mean_curve(runs: list[list[dict]], key: str) -> list[dict]:
    """Average a metric over seeds step by step (the steps are the same for every seed of an arm)."""
    by_step: dict[int, list[float]] = {}
    for records in runs:
        for r in records:
            if r.get(key) is not None:
                by_step.setdefault(r["step"], []).append(r[key])
    return [{"step": s, key: float(np.mean(v))} for s, v in sorted(by_step.items())]


def write_plots(out: Path, cc: CompareConfig, collapsed: frozenset[str] = frozenset()) -> list[Path]:
    """``collapsed``: arms whose LogPS curves would squash the others; the LogPS plots then add a zoomed panel."""
    arm_dirs = {a.name: sorted((out / "arms" / a.name).glob("seed-*")) for a in cc.arms}
    metrics = {name: [read_metrics(d / "metrics.jsonl") for d in dirs] for name, dirs in arm_dirs.items()}
    evals = {name: [read_metrics(d / "evals.jsonl") for d in dirs] for name, dirs in arm_dirs.items()}
    plots = out / "plots"
    acc = {name: [{"step": r["step"], "accuracy": 100 * r["accuracy"]} for r in _mean_curve(e, "accuracy")]
           for name, e in evals.items()}
    paths = [plot_metric(acc, "accuracy", plots / "accuracy.png", ylabel="held-out accuracy (%)",
                         title="Accuracy during stage 2 (mean over seeds)")]
    for key, fname, label in (("logps/chosen_normalized", "chosen_logps.png", "chosen"),
                              ("logps/rejected_normalized", "rejected_logps.png", "rejected")):
        runs = {name: _mean_curve(m, key) for name, m in metrics.items()}
        paths.append(plot_metric(runs, key, plots / fname,  # empty runs kept: an arm keeps its colour
                                 ylabel=f"{label} log-prob per token (nats)", title=f"{label.capitalize()} LogPS",
                                 zoom_without=collapsed))
    upd = {name: _mean_curve(m, "update_norm") for name, m in metrics.items()}
    paths.append(plot_metric(upd, "update_norm", plots / "update_norm.png", logy=True,
                             ylabel="‖Δθ‖ of the step (log scale)", title="Update norm"))
    return paths


def run_compare(config: Path, output: Path, backend: str = "", seeds: int | None = None,
                console: Console | None = None) -> dict:
    console = console or Console()
    cc = load_compare_config(config)
    if backend:
        cc.recipe.backend = backend
    if seeds is not None:
        cc.seeds = seeds
    output.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]redi compare[/]: {len(cc.arms)} arms × {cc.seeds} seed(s) → {output}")
    sft_model, data = sft_checkpoint(cc, output)
    evaluate = make_evaluator(cc, Path(data))
    base_path = output / "sft_eval.json"
    if base_path.exists():
        base_eval = json.loads(base_path.read_text())
    else:
        base_eval = evaluate(Path(sft_model))
        base_path.write_text(json.dumps(base_eval))
    results: dict[str, list[dict]] = {}
    for arm in cc.arms:
        for seed in range(cc.seeds):
            arm_dir = output / "arms" / arm.name / f"seed-{seed}"
            console.print(f"arm [bold]{arm.name}[/] seed {seed}")
            results.setdefault(arm.name, []).append(
                run_arm(cc, arm, cc.recipe.seed + seed, sft_model, data, arm_dir, evaluate, base_eval))
    rows = table_rows(cc, results)
    write_tables(output, rows, results, cc)
    write_plots(output, cc, frozenset(name for name, rs in results.items() if any(r["collapse"] for r in rs)))
    table = Table(title=f"redi compare (start: SFT at {100 * base_eval['accuracy']:.1f}%)")
    for col in COLUMNS:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*[str(r[c]) for c in COLUMNS])
    # Twelve columns fold into slivers at a pipe's default 80 columns; a terminal keeps its own width.
    (console if console.is_terminal else Console(width=max(console.width, 200))).print(table)
    console.print(f"table: {output / 'compare.md'}  plots: {output / 'plots'}")
    return {"rows": rows, "results": results, "sft_eval": base_eval}
