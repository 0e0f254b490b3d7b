"""``scripts/bench.py --tiny --with-trl`` for real on the CPU: ours and TRL's trainers (each setting in its own
process), per-step p50/p90 on both sides, the timing window, and ratios against the fastest TRL setting."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~1-2 min on a busy 2-core box: five TRL processes
def test_bench_tiny_with_trl_reports_window_percentiles_and_ratios(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--with-trl", "--steps", "3", "--warmup", "1",
           "--runs", "redi,sft", "--trl-runs", "simpo,sft", "--trl-settings", "gc,nogc,gc+pf", "--trl-timeout", "300",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench-256.json").read_text())
    assert report["window"] == {"steps": 3, "warmup": 1, "trl_steps": 3}

    ours = {r["run"]: r for r in report["results"]}
    for r in ours.values():
        assert r["timed_steps"] == 3 and len(r["warmup_step_s"]) == 1
        assert 0 < r["step_s_p50"] <= r["step_s_p90"]
    trl = {r["run"]: r for r in report["trl"]}
    # padding_free exists only in SFTTrainer: CPO gets checkpointing on and off, SFT on, off and padding-free on.
    assert sorted(trl) == ["trl_cpo_simpo [gc]", "trl_cpo_simpo [nogc]", "trl_sft [gc+pf]", "trl_sft [gc]", "trl_sft [nogc]"]
    for r in trl.values():
        assert "error" not in r, r
        assert r["timed_steps"] == 3 and r["warmup_steps"] == 1 and len(r["warmup_step_s"]) == 1
        assert 0 < r["step_s_p50"] <= r["step_s_p90"]
    assert trl["trl_cpo_simpo [nogc]"]["setting"] == {"gradient_checkpointing": False, "padding_free": False}
    assert trl["trl_sft [gc+pf]"]["setting"] == {"gradient_checkpointing": True, "padding_free": True}
    # Same sampler seed, same rows: the padding-free collator's one row holds exactly the padded batch's real tokens.
    assert trl["trl_sft [gc+pf]"]["timed_tokens"] == trl["trl_sft [gc]"]["timed_tokens"]

    # Each ratio is against the fastest setting of the peer trainer, recomputed here from the raw rows.
    ratios = {x["run"]: x for x in report["ratios"]}
    assert sorted(ratios) == ["redi", "sft"]
    for ours_name, peer in (("redi", "trl_cpo_simpo"), ("sft", "trl_sft")):
        settings = [r for name, r in trl.items() if name.startswith(peer + " [")]
        fastest = max(settings, key=lambda r: r["tokens_per_s"])
        assert ratios[ours_name]["against"] == fastest["run"]
        np.testing.assert_allclose(ratios[ours_name]["ratio"], ours[ours_name]["tokens_per_s"] / fastest["tokens_per_s"],
                                   rtol=2e-3)
    table = (tmp_path / "bench-256.md").read_text()
    assert "Timing window: 3 timed steps after 1 warm-up steps, each side." in table
    assert "step p50 / p90 s" in table and f"{ratios['redi']['ratio']:.2f}x trl_cpo_simpo" in table


@pytest.mark.slow  # ~30-60 s on a busy 2-core box: dynamo tracing of the tiny model
def test_profile_step_tiny_compiled_writes_top_table(tmp_path):
    """scripts/profile_step.py over one compiled step (aot_eager: dynamo's graph without C++), on the CPU."""
    out = tmp_path / "profile.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "REDI_COMPILE_BACKEND": "aot_eager"}
    cmd = [sys.executable, str(ROOT / "scripts" / "profile_step.py"), "--tiny", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "`redi+compile=true` (compiled: True)" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r[1]) for r in rows] == list(range(1, 16))
    ms = [float(r[4].replace(",", "")) for r in rows]
    assert ms == sorted(ms, reverse=True) and ms[-1] >= 0
    shares = [float(r[5].strip().rstrip("%")) for r in rows]
    assert 0 < sum(shares) <= 100.5
    total = float(text.split("self time in all: ")[1].split(" ms")[0].replace(",", ""))
    assert sum(ms) <= total + 0.1
    # The step is matrix products (projections, LM head chunks): a profile without them measured nothing.
    assert any("mm" in r[2] for r in rows[:5]), text
