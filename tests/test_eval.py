"""`redi eval` end to end on a tiny local model and a 5-problem local benchmark; `redi grade` on its samples
reproduces the reported numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from redi.evaluation.pipeline import EVAL_PROMPT, EvalSettings, render_prompt


def _bench(tmp_path):
    rows = [{"problem": f"{a}+{b}=?", "answer": str(a + b)} for a, b in [(1, 2), (10, 5), (7, 7), (30, 12), (9, 0)]]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(*args):
    return subprocess.run([sys.executable, "-m", "redi", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_prompt_is_the_papers_with_forced_think(tiny_tokenizer):
    text = render_prompt(tiny_tokenizer, "1+1?", EvalSettings())
    assert text.startswith("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert "efficiently and clearly.  The last line" in text and "$\\boxed{ANSWER}$" in text
    assert text.endswith("1+1?<|im_end|>\n<|im_start|>assistant<think>\n")  # no newline before <think>
    assert EVAL_PROMPT.format(Question="Q").endswith("answering.\n\nQ")
    plain = render_prompt(tiny_tokenizer, "1+1?", EvalSettings(force_think=False, system_prompt=None, template="raw"))
    assert plain == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_eval_files_and_regrade_agree(tmp_path, tiny_model_dir, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
        pytest.importorskip("redi.backends.mlx.backend")
    out = tmp_path / "eval"
    proc = _run("eval", "--model", tiny_model_dir, "--benchmark", str(_bench(tmp_path)), "--backend", backend,
                "--samples", "3", "--max-new-tokens", "12", "--output", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())["bench"]
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and {r["sample"] for r in rows} == {0, 1, 2}
    for r in rows:
        assert {"id", "response", "answer", "finish_reason", "tokens", "correct", "format_error"} <= set(r)
        assert r["finish_reason"] in ("stop", "length") and 0 < r["tokens"] <= 12
    assert results["problems"] == 5 and results["samples"] == 15
    assert results["truncation_rate"] == pytest.approx(sum(r["finish_reason"] == "length" for r in rows) / 15)
    graded = _run("grade", str(out / "samples.jsonl"), "--json", "--workers", "1")
    assert graded.returncode == 0, graded.stderr
    regraded = json.loads(graded.stdout)
    for key in ("pass@1", "pass@3", "sem", "problems", "samples", "format_errors"):
        assert regraded[key] == results[key], key
    # Resume: a second run generates nothing new and keeps the file.
    again = _run("eval", "--model", tiny_model_dir, "--benchmark", str(_bench(tmp_path)), "--backend", backend,
                 "--samples", "3", "--max-new-tokens", "12", "--output", str(out), "--workers", "1")
    assert again.returncode == 0 and len((out / "samples.jsonl").read_text().splitlines()) == 15


def test_unknown_benchmark_is_one_line(tmp_path, tiny_model_dir):
    proc = _run("eval", "--model", tiny_model_dir, "--benchmark", "gsm9k", "--output", str(tmp_path / "e"))
    assert proc.returncode == 2 and "gsm9k" in proc.stderr and "Traceback" not in proc.stderr
