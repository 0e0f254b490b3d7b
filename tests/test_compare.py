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
        assert rows[arm]["final accuracy"] == f"{100 * final['accuracy']:.1f} ± {100 * final['sem']:.1f}"
        assert rows[arm]["peak accuracy"] == f"{100 * peak['accuracy']:.1f} ± {100 * peak['sem']:.1f}"
        assert rows[arm]["peak step"] == str(peak["step"])
        assert rows[arm]["max update norm"] == f"{max(m['update_norm'] for m in metrics):.4f}"
        if arm != "control":
            assert rows[arm]["final chosen LogPS"] == f"{metrics[-1]['logps/chosen_normalized']:.3f}"
            assert rows[arm]["final rejected LogPS"] == f"{metrics[-1]['logps/rejected_normalized']:.3f}"
        # every arm starts from the same SFT checkpoint and sees the same batches
        assert evals[0]["accuracy"] == json.loads((out / "sft_eval.json").read_text())["accuracy"]
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
        want = f"{100 * np.mean(finals):.1f} ± {100 * np.std(finals, ddof=1):.1f}"
        assert rows[arm]["seeds"] == "2" and rows[arm]["final accuracy"] == want
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
        assert rows[arm]["final accuracy"] == f"{100 * result['final_accuracy']:.1f} ± {100 * result['final_sem']:.1f}"


def yaml_backend(path: Path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["backend"]
