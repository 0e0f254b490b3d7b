"""The `redi data generate` chain on the CPU, shared by tests/test_generate_chain.py (native engine) and the
vLLM test: a demo stage-1 teacher, generate on held-out demo problems, pair, train two REDI steps.

The teacher is the built-in demo's stage-1 model, made cheap: 2-digit addition and a 64-wide, 2-layer shape
(head dim 32: vLLM's CPU attention takes 32 and up),
300 SFT steps (40-150 s on the shared 2-core box). At T = 0.6 about half of its traces are right (36 of
80 in one run), so they come out both right and wrong.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

PROBLEMS = 20
SAMPLES = 4
_PROMPT = re.compile(r"^(\d+)\+(\d+)=\?$")
_BOXED = re.compile(r"\\boxed\{(\d+)\}\s*$")


def train_demo_teacher(out: Path) -> tuple[Path, Path]:
    """(stage-1 model folder, problems jsonl of held-out demo problems)."""
    import torch

    from redi.experiments.demo import demo_config
    from redi.training.api import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two spin-waiting OpenMP threads on a shared 2-core box are slower than one
    try:
        cfg = demo_config(str(out / "teacher"))
        cfg.backend, cfg.stage, cfg.seed = "cpu", "sft", 0
        cfg.sft.max_steps, cfg.sft.batch_size, cfg.sft.micro_batch_size = 300, 32, 32
        cfg.sft.learning_rate = 3e-3
        cfg.task.update({"problems": 1500, "eval_problems": PROBLEMS, "min_digits": 2, "max_digits": 2,
                         "model": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                                   "num_attention_heads": 2, "num_key_value_heads": 2}})
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    held_out = [json.loads(x) for x in (out / "teacher" / "builtin-data" / "eval.jsonl").read_text().splitlines()]
    problems = out / "problems.jsonl"
    problems.write_text("".join(json.dumps({"uid": r["problem_id"], "problem": r["prompt"], "answer": r["answer"]})
                                + "\n" for r in held_out))
    return out / "teacher" / "final", problems


def redi(*args: str, python: str = sys.executable, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([python, "-m", "redi", *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"redi {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def generate_args(teacher: Path, problems: Path, out: Path, engine: str) -> list[str]:
    # The demo teacher is a base model of bare "a+b=?" prompts: no chat turn, no instruction, no <think>.
    return ["data", "generate", "--teacher", str(teacher), "--problems", str(problems), "--output", str(out),
            "--samples", str(SAMPLES), "--engine", engine, "--backend", "cpu", "--instruction", "{problem}",
            "--no-chat-template", "--no-force-think", "--max-new-tokens", "48", "--id-field", "uid",
            "--workers", "0", "--chunk-problems", "8"]


def truly_correct(problem: str, trace: str, finish_reason: str) -> bool:
    """Independent of the grader: the trace ended by itself and its last boxed integer is a+b."""
    a, b = _PROMPT.match(problem).groups()
    m = _BOXED.search(trace)
    return finish_reason == "stop" and bool(m) and int(m.group(1)) == int(a) + int(b)


def check_chain(teacher: Path, problems: Path, tmp: Path, engine: str, python: str = sys.executable) -> dict:
    """generate -> pair -> train --stage pairs --max-steps 2; asserts each step; returns the report."""
    gen = tmp / f"gen-{engine}"
    redi(*generate_args(teacher, problems, gen, engine), python=python)
    rows = [json.loads(x) for x in (gen / "traces.jsonl").read_text().splitlines()]
    report = json.loads((gen / "report.json").read_text())
    assert len(rows) == PROBLEMS and all(len(r["generations"]) == SAMPLES for r in rows)
    for row in rows:
        expected = [truly_correct(row["problem"], g, f) for g, f in zip(row["generations"], row["finish_reasons"])]
        assert row["correct"] == expected, row
    correct = sum(sum(r["correct"]) for r in rows)
    assert 0 < correct < PROBLEMS * SAMPLES, f"{correct} correct traces: need some right and some wrong"
    assert report["correct_traces"] == correct and report["traces"] == PROBLEMS * SAMPLES
    pairable = sum(any(r["correct"]) and not all(r["correct"]) for r in rows)
    assert report["pairable_problems"] == pairable > 0

    paired = tmp / f"paired-{engine}"
    redi("data", "pair", str(gen / "traces.jsonl"), "--output", str(paired), "--format", "jsonl", python=python)
    pairs = [json.loads(x) for x in (paired / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == pairable

    run = tmp / f"train-{engine}"
    redi("train", "--stage", "pairs", "--model", str(teacher), "--data", str(paired), "--output", str(run),
         "--max-steps", "2", "--backend", "cpu", "--set", "pairs.batch_size=4", "--set", "pairs.micro_batch_size=4",
         python=python)
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("stage") == "pairs"][-1] == 2
    assert (run / "final" / "model.safetensors").exists()
    return report
