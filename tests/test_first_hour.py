"""A new user's first hour (issue 15): wrong results caught, fast failures, one clear line each.

Each CLI check asserts the exit code, one line on stderr naming the culprit, no traceback, and that nothing
the user had was lost or overwritten.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def redi(*args, timeout=300, env=None):
    proc = subprocess.run([sys.executable, "-m", "redi", *args], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def one_line(code, out, err, expect=2):
    assert code == expect, (code, out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- 1: Ctrl-C


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "redi", "train", "--config", TINY, "--backend", "cpu",
                             "--stage", "sft", "--max-steps", "400", "--save-every", "2", "--output", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics, t0 = run / "metrics.jsonl", time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 240, "training never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    line = one_line(proc.returncode, out, err, expect=130)
    assert f"redi train --resume {run}" in line and "checkpoints/step-" in line and "sft step" in line
