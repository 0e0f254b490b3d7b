"""`redi eval --dry-run` resolves benchmarks (shipped names and files) without a model and writes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.resources import files


def redi(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "redi", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_dry_run_resolves_shipped_and_local_benchmarks(tmp_path):
    local = tmp_path / "mine.jsonl"
    local.write_text("".join(json.dumps({"problem": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    before = set(tmp_path.iterdir())
    proc = redi("eval", "--benchmark", "aime24", "--benchmark", str(local), "--limit", "2", "--samples", "4",
                "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    shipped = files("redi.evaluation") / "benchmarks" / "aime.json"
    assert len(json.loads(shipped.read_text())) == 30  # the paper's AIME 2024
    lines = proc.stdout.splitlines()
    assert lines[0] == f"aime24: 2 problems from {shipped}"
    assert lines[1] == f"mine: 2 problems from {local}"
    assert lines[2].startswith("4 samples each, T 0.6, top-p 0.95, 32768 new tokens, grader rllm")
    assert set(tmp_path.iterdir()) == before  # no eval/ folder


def test_model_is_required_without_dry_run(tmp_path):
    proc = redi("eval", "--benchmark", "aime24", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: --model is required (only --dry-run runs without one)"
