"""`redi eval` end to end on a tiny local model and a 5-problem local benchmark; `redi grade` on its samples
reproduces the reported numbers."""
from __future__ import annotations

import json
import os
from pathlib import Path
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


def test_paper_benchmarks_load_offline():
    from redi.evaluation.pipeline import PAPER_BENCHMARKS, load_benchmark

    sizes = {name: len(load_benchmark(name)[1]) for name in PAPER_BENCHMARKS}
    # The paper's sets (rllm's test files; docs/benchmarks.md): 500 + 30 + 83 + 272 + 675.
    assert sizes == {"math500": 500, "aime24": 30, "amc23": 83, "minerva": 272, "olympiadbench": 675}
    assert sum(sizes.values()) == 1560
    _, amc = load_benchmark("amc23")
    assert amc[0]["answer"] == 142.0 or isinstance(amc[0]["answer"], float)  # AMC golds are floats
    _, minerva = load_benchmark("minerva")
    assert all(isinstance(p["answer"], list) for p in minerva)  # Minerva golds are lists, any counts
    _, olympiad = load_benchmark("olympiadbench")
    assert len({str(p["id"]) for p in olympiad}) == 675  # ids are unique, so resume can key on them


def _eval_args(model, bench, out, *extra):
    return ("eval", "--model", model, "--benchmark", str(bench), "--engine", "native", "--backend", "cpu",
            "--samples", "1", "--max-new-tokens", "4", "--output", str(out), "--workers", "1", *extra)


def test_resume_with_another_model_or_settings_is_refused(tmp_path, tiny_model_dir, im_end_model_dir):
    """Regression (issue 15 item 2): the same --output with another --model used to append to the first
    model's samples.jsonl and grade them together."""
    bench, out = _bench(tmp_path), tmp_path / "eval"
    assert _run(*_eval_args(tiny_model_dir, bench, out)).returncode == 0
    recorded = json.loads((out / "settings.json").read_text())
    assert recorded["model"] == str(Path(tiny_model_dir).resolve())
    other = _run(*_eval_args(im_end_model_dir, bench, out, "--temperature", "0.7"))
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "differing in: model, temperature" in other.stderr
    assert len((out / "samples.jsonl").read_text().splitlines()) == 5  # nothing appended
    # More samples of the same model and settings is a resume, not a mismatch.
    more = _run(*_eval_args(tiny_model_dir, bench, out, "--samples", "2"))  # the later --samples wins
    assert more.returncode == 0, more.stderr
    assert len((out / "samples.jsonl").read_text().splitlines()) == 10
    forced = _run(*_eval_args(im_end_model_dir, bench, out, "--force"))
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "settings.json").read_text())["model"].endswith(Path(im_end_model_dir).name)


def test_samples_without_settings_are_refused(tmp_path, tiny_model_dir):
    bench, out = _bench(tmp_path), tmp_path / "old"
    out.mkdir()
    (out / "samples.jsonl").write_text('{"benchmark": "bench", "id": 0, "sample": 0, "response": "", '
                                       '"answer": "3", "finish_reason": "stop", "tokens": 1}\n')
    proc = _run(*_eval_args(tiny_model_dir, bench, out))
    assert proc.returncode == 2 and "settings.json is not" in proc.stderr


def test_eval_table_fits_80_columns():
    from rich.console import Console

    from redi.cli.eval import results_table

    row = {"problems": 675, "samples": 10800, "n": 16, "pass@1": 0.4321, "pass@16": 0.7012, "sem": 0.0043,
           "mean_response_tokens": 12345.6, "truncation_rate": 0.123, "format_errors": 1234, "grader": "rllm"}
    results = {name: dict(row) for name in ("math500", "aime24", "amc23", "minerva", "olympiadbench")}
    console = Console(width=80, record=True, force_terminal=False)
    console.print(results_table(results, "redi eval: /checkpoints/qwen-redi-1.5b/final"))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    # Every header and value whole (no wrapping, no ellipsis): one line per benchmark.
    for cell in ("benchmark", "problems", "pass@1 (n=16)", "pass@16", "tokens", "truncated", "format err",
                 "olympiadbench", "43.2 ± 0.4", "70.1", "12346", "12%", "1234", "grader: rllm"):
        assert cell in text, cell
    assert "…" not in text
