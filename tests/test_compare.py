"""`redi compare` on a tiny grid: the table's numbers are those of each arm's metrics.jsonl and evals.jsonl."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from redi.experiments.compare_report import run_compare  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _grid(tmp_path, seeds=1):
    bench = tmp_path / "heldout.jsonl"
    bench.write_text("".join(json.dumps({"problem": f"{a}+{b}=?", "answer": str(a + b)}) + "\n"
                             for a, b in [(12, 30), (100, 1), (55, 45), (7, 800)]))
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(f"""
recipe: {TINY}
eval_every: 2
seeds: {seeds}
overrides: {{backend: cpu, sft: {{max_steps: 3}}, pairs: {{max_steps: 4, batch_size: 8, micro_batch_size: 8}}}}
eval: {{benchmark: {bench}, samples: 2, max_new_tokens: 8, template: raw, workers: 1}}
arms:
  - {{name: control, objective: sft, learning_rate: 1.0e-3}}
  - {{name: redi, objective: redi, alpha: 0.8, learning_rate: 1.0e-3}}
  - {{name: dpo, objective: dpo, beta: 0.1, learning_rate: 1.0e-3}}
""")
    return cfg


def _rows(out):
    with (out / "compare.csv").open() as fh:
        return {r["arm"]: r for r in csv.DictReader(fh)}


def test_compare_table_matches_arm_files(tmp_path):
    out = tmp_path / "C"
    run_compare(_grid(tmp_path), out)
    rows = _rows(out)
    assert set(rows) == {"control", "redi", "dpo"}
    for arm in rows:
        run = out / "arms" / arm / "seed-0"
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [json.loads(x) for x in (run / "evals.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [0, 2, 4]
        final, peak = evals[-1], max(evals, key=lambda e: e["accuracy"])
        # compare.csv holds numbers: accuracy in %, the SEM (one seed) and the std over seeds in their own columns
        assert float(rows[arm]["final_accuracy"]) == pytest.approx(100 * final["accuracy"], abs=0.005)
        assert float(rows[arm]["final_accuracy_sem"]) == pytest.approx(100 * final["sem"], abs=0.005)
        assert rows[arm]["final_accuracy_std"] == ""
        assert float(rows[arm]["peak_accuracy"]) == pytest.approx(100 * peak["accuracy"], abs=0.005)
        assert rows[arm]["peak_step"] == str(peak["step"])
        assert float(rows[arm]["max_update_norm"]) == pytest.approx(max(m["update_norm"] for m in metrics), abs=1e-5)
        if arm != "control":
            assert float(rows[arm]["final_chosen_logps"]) == pytest.approx(metrics[-1]["logps/chosen_normalized"], abs=1e-5)
            assert float(rows[arm]["final_rejected_logps"]) == pytest.approx(metrics[-1]["logps/rejected_normalized"], abs=1e-5)
        # every arm starts from the same SFT checkpoint and sees the same batches
        start_eval = next((out / "start" / "sft").glob("eval-*.json"))
        assert evals[0]["accuracy"] == json.loads(start_eval.read_text())["accuracy"]
    md = (out / "compare.md").read_text()
    assert all(f"| {arm} |" in md for arm in rows)
    for name in ("accuracy", "chosen_logps", "rejected_logps", "update_norm"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 10_000
    # A rerun skips finished arms.
    stamp = (out / "arms" / "redi" / "seed-0" / "arm_result.json").stat().st_mtime_ns
    run_compare(_grid(tmp_path), out)
    assert (out / "arms" / "redi" / "seed-0" / "arm_result.json").stat().st_mtime_ns == stamp


def test_compare_bad_config_is_one_line(tmp_path):
    from redi.experiments.compare import load_compare_config
    from redi.errors import UserError

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"recipe: {TINY}\narms:\n  - {{name: x, objective: redi, lr: 1}}\n")
    with pytest.raises(UserError, match="arm 1: .*unknown keys: lr"):
        load_compare_config(bad)


def test_seeds_give_mean_and_std_over_seeds(tmp_path):
    import numpy as np

    out = tmp_path / "C"
    run_compare(_grid(tmp_path, seeds=2), out)
    rows = _rows(out)
    for arm in rows:
        finals = [json.loads((out / "arms" / arm / f"seed-{k}" / "arm_result.json").read_text())["final_accuracy"]
                  for k in (0, 1)]
        assert rows[arm]["seeds"] == "2"
        assert float(rows[arm]["final_accuracy"]) == pytest.approx(100 * np.mean(finals), abs=0.005)
        assert float(rows[arm]["final_accuracy_std"]) == pytest.approx(100 * np.std(finals, ddof=1), abs=0.005)
    # the two seeds of an arm saw different batch orders: their first losses differ
    first = [json.loads((out / "arms" / "redi" / f"seed-{k}" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
             for k in (0, 1)]
    assert first[0] != first[1]


def test_compare_runs_on_mlx(tmp_path):
    pytest.importorskip("mlx.core")
    out = tmp_path / "C"
    run_compare(_grid(tmp_path), out, backend="mlx")
    rows = _rows(out)
    assert set(rows) == {"control", "redi", "dpo"}
    for arm in rows:
        result = json.loads((out / "arms" / arm / "seed-0" / "arm_result.json").read_text())
        assert yaml_backend(out / "arms" / arm / "seed-0" / "config.yaml") == "mlx"
        assert float(rows[arm]["final_accuracy"]) == pytest.approx(100 * result["final_accuracy"], abs=0.005)


def yaml_backend(path: Path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["backend"]


def _bench(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"problem": f"{a}+{a}=?", "answer": str(2 * a)}) + "\n" for a in range(n)))
    return path


def test_user_sft_folder_is_only_read_and_eval_cache_follows_settings(tmp_path):
    """Regression: compare wrote its evaluation cache into the user's SFT folder (<sft>/../eval-final) and
    reused it whatever the evaluation settings. Now every file is under --output, keyed by the settings."""
    from redi.tiny import build_model

    user = build_model(tmp_path / "user-sft" / "final", seed=1)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "user-sft").rglob("*")}
    bench = _bench(tmp_path / "heldout.jsonl", 4)
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
recipe: {TINY}
eval_every: 2
sft_checkpoints: {{mine: {user}}}
overrides: {{backend: cpu, pairs: {{max_steps: 2, batch_size: 8, micro_batch_size: 8}}}}
eval: {{benchmarks: [{bench}], samples: 2, max_new_tokens: 4, template: raw, workers: 1}}
arms:
  - {{name: redi, objective: redi, learning_rate: 1.0e-3}}
""")
    out = tmp_path / "C"
    run_compare(grid, out)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "user-sft").rglob("*")} == before
    first = list((out / "start" / "mine").glob("eval-*/samples.jsonl"))
    assert len(first) == 1 and len(first[0].read_text().splitlines()) == 4 * 2
    metrics = out / "arms" / "redi" / "seed-0" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime_ns
    run_compare(grid, out, sets=["eval.samples=3"])  # new settings: new samples, the trained arm is kept
    caches = sorted((out / "start" / "mine").glob("eval-*/samples.jsonl"))
    assert len(caches) == 2 and sorted(len(c.read_text().splitlines()) for c in caches) == [8, 12]
    assert metrics.stat().st_mtime_ns == stamp
    evals = [json.loads(x) for x in (out / "arms" / "redi" / "seed-0" / "evals.jsonl").read_text().splitlines()]
    assert all(e["samples"] == 3 for e in evals)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "user-sft").rglob("*")} == before


PAPER_GRID = Path(__file__).resolve().parents[1] / "configs" / "paper" / "compare.yaml"


def test_paper_grid_runs_end_to_end_on_a_tiny_model(tmp_path):
    """configs/paper/compare.yaml itself, with --set overrides down to tiny models, pairs and a 5-problem set."""
    import io

    import yaml
    from rich.console import Console

    from redi.tiny import build_model

    sft3, sft5 = build_model(tmp_path / "sft-3ep", seed=1), build_model(tmp_path / "sft-5ep", seed=2)
    bench = _bench(tmp_path / "math500.jsonl", 5)
    sets = [f"sft_checkpoints.sft-3ep.path={sft3}", f"sft_checkpoints.sft-5ep.path={sft5}", "data=builtin:tiny",
            "backend=cpu", "pairs.max_steps=2", "pairs.batch_size=8", "pairs.micro_batch_size=8",
            "pairs.max_length=256", "pairs.max_prompt_length=128", "eval_every=2", f"eval.benchmarks=[{bench}]",
            "eval.samples=1", "eval.max_new_tokens=4", "eval.workers=1", "task.problems=16", "system_prompt="]
    printed = io.StringIO()
    out = tmp_path / "C"
    run_compare(PAPER_GRID, out, console=Console(file=printed, width=80), sets=sets)
    rows = _rows(out)
    assert list(rows) == ["redi", "symmetric", "dpo", "simpo", "continued-sft", "redi-5ep"]
    grid = yaml.safe_load(PAPER_GRID.read_text())
    for arm in grid["arms"]:
        row, run = rows[arm["name"]], out / "arms" / arm["name"] / "seed-0"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["model"] == str(sft5 if arm["start"] == "sft-5ep" else sft3) and row["start"] == arm["start"]
        stage = "sft" if arm["objective"] == "sft" else "pairs"
        assert cfg[stage]["learning_rate"] == arm["learning_rate"] == float(row["learning_rate"])
        for key in ("alpha", "beta", "gamma"):
            assert cfg.get(key) == arm.get(key)  # keys the objective does not use are left out
        # the paper's numbers beside the run's, per benchmark (this file is named math500) and on average
        assert row["paper_avg"] == (str(arm["paper"]["avg"]) if "paper" in arm else "")
        assert row["paper_math500"] == (str(arm["paper"]["math500"]) if "paper" in arm else "")
        assert [json.loads(x)["step"] for x in (run / "evals.jsonl").read_text().splitlines()] == [0, 2]
    md = (out / "compare.md").read_text()
    assert "| redi-5ep | sft-5ep | redi |" in md and " | 49.5 | " in md and "| sft-3ep (start) | " in md
    assert "(83.1)" in md and "(76.7)" in md  # per benchmark: Table 1's REDI and Table 2's SFT-3ep start
    text = printed.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for word in ("continued-sft", "redi-5ep", "collapse", "paper", "(83.1)"):
        assert word in text  # whole words: nothing folded at 80 columns
    for plot in ("accuracy", "chosen_logps", "rejected_logps", "update_norm"):
        assert (out / "plots" / f"{plot}.png").exists()


def test_step_axes_have_integer_ticks_and_accuracy_none_below_zero():
    import matplotlib.pyplot as plt

    from redi.experiments.plots import _label

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [0.0, 0.0, 0.0])
    _label(ax, xlabel="optimizer step", ylabel="accuracy (%)", title="", nonnegative=True)
    lo, hi = ax.get_xlim()
    assert all(float(t).is_integer() for t in ax.get_xticks() if lo <= t <= hi)
    assert ax.get_ylim()[0] >= 0 and min(t for t in ax.get_yticks() if t >= ax.get_ylim()[0]) >= 0
    plt.close(fig)


def test_neg_weighting_and_chosen_coef_are_arm_keys(tmp_path):
    """Issue 24: REDI's negative weighting (either variant) and c_w are compare arms like any objective key."""
    from redi.experiments.compare import arm_config, load_compare_config

    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""recipe: {TINY}
arms:
  - {{name: negw, objective: redi, neg_weighting_gamma: 1.5, chosen_coef: 0.9}}
  - {{name: negw-detached, objective: redi, neg_weighting_detached_gamma: 2.0}}
  - {{name: own-data, objective: redi, data: elsewhere/pairs}}
""")
    cc = load_compare_config(grid)
    configs = [arm_config(cc, arm, 0, "sft-model", "grid-data", tmp_path / arm.name) for arm in cc.arms]
    assert [(c.neg_weighting_gamma, c.neg_weighting_detached_gamma, c.chosen_coef) for c in configs] == [
        (1.5, 0.0, 0.9), (0.0, 2.0, 1.0), (0.0, 0.0, 1.0)]  # unset keys: the paper's (off, c_w 1)
    assert [c.data for c in configs] == ["grid-data", "grid-data", "elsewhere/pairs"]


def test_the_whole_grid_is_checked_before_any_arm_trains(tmp_path):
    """Issue 22 §5: an unknown objective in arm 2 surfaced only after arm 1 had trained, and the list of
    objectives in the message left out sft, which compare accepts."""
    from redi.errors import UserError
    from redi.experiments.compare import load_compare_config

    grid = tmp_path / "grid.yaml"
    grid.write_text(f"recipe: {TINY}\narms:\n  - {{name: a, objective: sft}}\n  - {{name: b, objective: redo}}\n")
    with pytest.raises(UserError) as caught:
        load_compare_config(grid)
    message = str(caught.value)
    assert "arm 2 (b): unknown objective 'redo'" in message
    assert message.endswith("valid objectives: redi, symmetric, dpo, simpo, orpo, sft")
    grid.write_text(f"recipe: {TINY}\narms:\n  - {{name: a, objective: redi}}\n"
                    "  - {name: b, objective: dpo, beta: -1}\n")
    with pytest.raises(UserError, match=r"arm 2 \(b\): config key 'beta' must be positive"):
        load_compare_config(grid)
