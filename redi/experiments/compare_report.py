"""`redi compare` driver and its report: the table (md, csv, json), the plots, the printed summary.

compare.csv holds numbers only (accuracy in %, mean and spread in separate columns); compare.md and the
printed tables hold the same numbers formatted, the printed ones narrow enough for an 80-column terminal.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from redi.atomic import write_text_atomic
from redi.experiments.compare import (CompareConfig, benchmarks_of, load_compare_config, make_evaluator, run_arm,
                                      start_models)
from redi.experiments.plots import plot_metric
from redi.training.metrics import read_metrics

MD_COLUMNS = ["arm", "start", "objective", "hyperparameters", "seeds", "final accuracy", "peak accuracy", "peak step",
              "paper", "final chosen LogPS", "final rejected LogPS", "max update norm", "collapse", "wall time (s)"]


def _stats(values: list, scale: float = 1.0) -> tuple[float | None, float | None]:
    """(mean, sample std over seeds; None for one seed) of the non-missing values, scaled."""
    vals = [scale * v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def _num(x: float | None, digits: int) -> str | float:
    """``digits`` decimals for percentages; tiny quantities (an update norm) keep 6 significant digits instead."""
    if x is None:
        return ""
    return round(x, digits) if abs(x) >= 10 ** -digits * 100 or x == 0 else float(f"{x:.6g}")


def table_rows(cc: CompareConfig, results: dict[str, list[dict]]) -> list[dict]:
    """One row of numbers per arm: accuracy in %, its std over seeds and the paper's SEM over samples."""
    rows = []
    for arm in cc.arms:
        rs = results[arm.name]
        first = rs[0]
        row: dict = {"arm": arm.name, "start": first.get("start", ""), "objective": arm.objective,
                     "learning_rate": first["learning_rate"]}
        row.update({k: first.get(k, "") for k in ("alpha", "beta", "gamma")})
        row["seeds"] = len(rs)
        for which in ("final", "peak"):
            mean, std = _stats([r[f"{which}_accuracy"] for r in rs], 100)
            row[f"{which}_accuracy"], row[f"{which}_accuracy_std"] = _num(mean, 2), _num(std, 2)
            row[f"{which}_accuracy_sem"] = _num(_stats([r[f"{which}_sem"] for r in rs], 100)[0], 2)
        row["peak_step"] = " ".join(str(r["peak_step"]) for r in rs)
        for bench in benchmarks_of(cc.eval):
            name = Path(bench).stem if Path(bench).suffix else bench
            row[f"peak_{name}"] = _num(_stats([r.get("peak_benchmarks", {}).get(name, {}).get("accuracy")
                                               for r in rs], 100)[0], 2)
            row[f"paper_{name}"] = arm.paper.get(name, "")
        row["paper_avg"] = arm.paper.get("avg", "")
        for key in ("final_chosen_logps", "final_rejected_logps", "max_update_norm"):
            row[key] = _num(_stats([r[key] for r in rs])[0], 5)
        row["collapsed_seeds"] = sum(r["collapse"] for r in rs)
        row["wall_time_s"] = round(sum(r["wall_time_s"] for r in rs), 1)
        rows.append(row)
    return rows


def _pm(mean, spread, digits: int = 1) -> str:
    if mean == "":
        return "-"
    return f"{mean:.{digits}f}" + ("" if spread == "" else f" ± {spread:.{digits}f}")


def _formatted(row: dict) -> dict:
    """The row as compare.md shows it: one seed ± the paper's SEM over samples, several ± std over seeds."""
    spread = {w: row[f"{w}_accuracy_std"] if row["seeds"] > 1 else row[f"{w}_accuracy_sem"] for w in ("final", "peak")}
    hyper = ", ".join(f"{k}={row[k]:g}" for k in ("learning_rate", "alpha", "beta", "gamma") if row.get(k) != "")
    return {
        "arm": row["arm"], "start": row["start"], "objective": row["objective"],
        "hyperparameters": hyper.replace("learning_rate", "lr"), "seeds": row["seeds"],
        "final accuracy": _pm(row["final_accuracy"], spread["final"]),
        "peak accuracy": _pm(row["peak_accuracy"], spread["peak"]), "peak step": row["peak_step"],
        "paper": _pm(row["paper_avg"], ""),
        "final chosen LogPS": _pm(row["final_chosen_logps"], "", 3),
        "final rejected LogPS": _pm(row["final_rejected_logps"], "", 3),
        "max update norm": _pm(row["max_update_norm"], "", 4),
        "collapse": f"{'yes' if row['collapsed_seeds'] else 'no'} ({row['collapsed_seeds']}/{row['seeds']})",
        "wall time (s)": f"{row['wall_time_s']:.0f}",
    }


def _bench_names(cc: CompareConfig) -> list[str]:
    return [Path(b).stem if Path(b).suffix else b for b in benchmarks_of(cc.eval)]


def write_tables(out: Path, rows: list[dict], results: dict, cc: CompareConfig, start_evals: dict) -> None:
    with (out / "compare.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shown = [_formatted(r) for r in rows]
    lines = ["# redi compare", "",
             f"Stage 2 from {', '.join(s.name for s in cc.starts)}; {cc.seeds} seed(s) per arm; evaluation every "
             f"{cc.eval_every} steps, peak = the best checkpoint (as the paper's Table 2). Accuracy in %: one seed "
             "shows ± the paper's SEM over samples, several show mean ± std over seeds. Paper: the average the paper "
             "reports for the arm. Collapse: the alarm of redi/training/guards.py "
             "(both LogPS at least 0.1 nats/token below and twice their start).", "",
             "| " + " | ".join(MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in MD_COLUMNS) + " |" for r in shown]
    benches = _bench_names(cc)
    if benches:
        lines += ["", "Per benchmark, pass@1 (%) at each arm's peak checkpoint; the paper's number in brackets.", "",
                  "| arm | " + " | ".join(benches) + " |", "|---|" + "---|" * len(benches)]
        for s in cc.starts:
            ev = start_evals[s.name].get("benchmarks", {})
            lines.append(f"| {s.name} (start) | " + " | ".join(_cell(_pct(ev, b), s.paper.get(b)) for b in benches) + " |")
        for r, arm in zip(rows, cc.arms):
            lines.append(f"| {r['arm']} | " + " | ".join(_cell(r[f'peak_{b}'], arm.paper.get(b)) for b in benches) + " |")
    lines += ["", "Plots: " + ", ".join(f"[{p}](plots/{p})" for p in
                                      ("accuracy.png", "chosen_logps.png", "rejected_logps.png", "update_norm.png"))]
    write_text_atomic(out / "compare.md", "\n".join(lines) + "\n")
    write_text_atomic(out / "compare.json", json.dumps({"results": results, "starts": start_evals}, indent=2))


def _cell(run_pct, paper) -> str:
    """A run's pass@1 (%) beside the paper's, in brackets."""
    text = "-" if run_pct in ("", None) else f"{run_pct:.1f}"
    return text + ("" if paper is None else f" ({paper:.1f})")


def _pct(bench_evals: dict, name: str) -> float | None:
    acc = bench_evals.get(name, {}).get("accuracy")
    return None if acc is None else 100 * acc


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
                         title="Accuracy during stage 2 (mean over seeds)", nonnegative=True)]
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


def print_tables(console: Console, rows: list[dict], cc: CompareConfig, start_evals: dict) -> None:
    """Two narrow tables (fit 80 columns): the arms, then pass@1 per benchmark beside the paper's."""
    table = Table(title="redi compare: accuracy % (peak = best checkpoint)")
    for col in ("arm", "start", "final", "peak", "step", "paper", "collapse"):
        table.add_column(col, justify="left" if col in ("arm", "start") else "right", overflow="fold")
    for s in cc.starts:
        ev = start_evals[s.name]
        table.add_row(f"{s.name} (start)", "", f"{100 * ev['accuracy']:.1f}", "", "0", _pm(s.paper.get("avg", ""), ""), "")
    for r in rows:
        f = _formatted(r)
        table.add_row(r["arm"], r["start"], _pm(r["final_accuracy"], ""), _pm(r["peak_accuracy"], ""),
                      r["peak_step"], f["paper"], "yes" if r["collapsed_seeds"] else "no")
    console.print(table)
    benches = _bench_names(cc)
    if len(benches) > 1 or any(a.paper for a in cc.arms):
        per = Table(title="pass@1 % at the peak checkpoint (paper's in brackets)")
        per.add_column("arm", overflow="fold")
        for b in benches:
            per.add_column(b[:12], justify="right", overflow="fold")
        for s in cc.starts:
            ev = start_evals[s.name].get("benchmarks", {})
            per.add_row(s.name, *[_cell(_pct(ev, b), s.paper.get(b)) for b in benches])
        for r, arm in zip(rows, cc.arms):
            per.add_row(r["arm"], *[_cell(r[f"peak_{b}"], arm.paper.get(b)) for b in benches])
        console.print(per)


def run_compare(config: Path, output: Path, backend: str = "", seeds: int | None = None,
                console: Console | None = None, sets: list[str] | None = None) -> dict:
    console = console or Console()
    cc = load_compare_config(config, sets)
    if backend:
        cc.recipe.backend = backend
    if seeds is not None:
        cc.seeds = seeds
    output.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]redi compare[/]: {len(cc.arms)} arms × {cc.seeds} seed(s) → {output}")
    models, data = start_models(cc, output)
    evaluate = make_evaluator(cc, Path(data))
    start_evals = {}
    for name, model in models.items():
        # Cached under OUTPUT/start/NAME: the user's SFT folder is read, never written.
        cache = output / "start" / name
        done = cache / f"eval-{getattr(evaluate, 'key', 'default')}.json"
        if not done.exists():
            cache.mkdir(parents=True, exist_ok=True)
            write_text_atomic(done, json.dumps(evaluate(Path(model), cache)))
        start_evals[name] = json.loads(done.read_text())
    results: dict[str, list[dict]] = {}
    for arm in cc.arms:
        start = cc.start_of(arm).name
        for seed in range(cc.seeds):
            arm_dir = output / "arms" / arm.name / f"seed-{seed}"
            console.print(f"arm [bold]{arm.name}[/] from {start}, seed {seed}")
            results.setdefault(arm.name, []).append(
                run_arm(cc, arm, cc.recipe.seed + seed, models[start], data, arm_dir, evaluate, start_evals[start]))
    rows = table_rows(cc, results)
    write_tables(output, rows, results, cc, start_evals)
    write_plots(output, cc, frozenset(name for name, rs in results.items() if any(r["collapse"] for r in rs)))
    print_tables(console, rows, cc, start_evals)
    console.print(f"table: {output / 'compare.md'}  plots: {output / 'plots'}")
    return {"rows": rows, "results": results, "start_evals": start_evals}
