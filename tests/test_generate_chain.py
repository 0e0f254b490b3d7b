"""`redi data generate` end to end on the CPU with the native engine: the demo's stage-1 teacher on 20 held-out
problems -> labelled traces (some right, some wrong) -> `redi data pair` -> `redi train --stage pairs`. The
same chain with vLLM is tests/vllm_engine/test_generate_vllm.py. Also: SIGKILL mid-generation and resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from generate_chain import check_chain, train_demo_teacher

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def demo_teacher(tmp_path_factory):
    return train_demo_teacher(tmp_path_factory.mktemp("demo-teacher"))


def test_generate_pair_train_chain_native(demo_teacher, tmp_path):
    teacher, problems = demo_teacher
    report = check_chain(teacher, problems, tmp_path, "native")
    assert report["settings"]["engine"] == "native" and report["this_run"]["tokens_per_second"] > 0


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


GENERATE = ["--samples", "2", "--engine", "native", "--backend", "cpu", "--max-new-tokens", "32",
            "--chunk-problems", "2", "--workers", "0"]


def _problems(path):
    path.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"What is {i}+{i}?", "answer": str(2 * i)})
                            + "\n" for i in range(8)))
    return path


def test_sigkill_mid_generation_then_resume_gives_the_same_traces(tiny_model_dir, tmp_path):
    from redi.errors import UserError
    from redi.pairing.generate import GenerateSettings, generate_traces

    problems = _problems(tmp_path / "problems.jsonl")
    settings = GenerateSettings(samples=2, engine="native", backend="cpu", max_new_tokens=32, chunk_problems=2,
                                workers=0)
    generate_traces(tiny_model_dir, str(problems), tmp_path / "whole", settings)  # uninterrupted, in-process
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "redi", "data", "generate", "--teacher", tiny_model_dir, "--problems",
               str(problems), "--output", str(out), *GENERATE]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    traces = out / "traces.jsonl"
    t0 = time.time()
    while not (traces.exists() and len(_rows(traces)) >= 2):  # one chunk of four written
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read()}"
        assert time.time() - t0 < 300, "kill point never reached"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _rows(traces)
    assert 2 <= len(partial) < 8
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    rows = _rows(traces)
    assert [r["problem_id"] for r in rows] == [f"p{i}" for i in range(8)]  # no duplicates, none missing
    assert rows[:len(partial)] == partial  # finished problems were not generated again
    assert rows == _rows(tmp_path / "whole" / "traces.jsonl")  # the same traces as the uninterrupted run
    report = json.loads((out / "report.json").read_text())
    assert report["this_run"]["problems_generated"] == 8 - len(partial) and report["problems"] == 8
    # A changed setting is refused on resume, naming the key; nothing is generated.
    settings.temperature = 0.9
    with pytest.raises(UserError, match="temperature"):
        generate_traces(tiny_model_dir, str(problems), out, settings)
    assert _rows(traces) == rows
