"""Fault injection: SIGKILL a training subprocess at several points, resume, and compare with an
uninterrupted run. On the CPU in fp32 the final weights and every per-step loss must be bit-identical."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import available_backends

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
ARGS = ["--config", TINY, "--stage", "both", "--set", "sft.max_steps=14", "--set", "pairs.max_steps=14",
        "--save-every", "3", "--keep-last", "2"]


_backends = available_backends


def _cmd(backend, out, resume=False):
    base = [sys.executable, "-m", "redi", "train", "--backend", backend]
    return base + (["--resume", str(out)] if resume else ARGS + ["--output", str(out)])


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def _lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_when(proc, ready, timeout=240):
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the kill point: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _result(run):
    from safetensors.numpy import load_file

    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    return losses, load_file(str(run / "final" / "model.safetensors"))


@pytest.fixture(scope="module", params=_backends())
def reference(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = subprocess.run(_cmd(request.param, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return request.param, _result(out)


@pytest.mark.parametrize("point", ["mid-sft", "sft-pairs-boundary", "mid-pairs", "during-checkpoint-write"])
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, point):
    backend, (ref_losses, ref_weights) = reference
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    ckpts = run / "checkpoints"
    env = _env(REDI_FAULT_CHECKPOINT_DELAY="2") if point == "during-checkpoint-write" else _env()
    proc = subprocess.Popen(_cmd(backend, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ready = {
        "mid-sft": lambda: _lines(metrics) >= 5,
        "sft-pairs-boundary": lambda: (run / "sft_final").exists(),
        "mid-pairs": lambda: _lines(metrics) >= 22,
        "during-checkpoint-write": lambda: ckpts.exists() and any(p.name.startswith(".tmp-step-9") for p in ckpts.iterdir()),
    }[point]
    _kill_when(proc, ready)
    if point == "during-checkpoint-write":
        assert not (ckpts / "step-9").exists()  # the half-written folder is not a checkpoint
    resumed = subprocess.run(_cmd(backend, run, resume=True), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    losses, weights = _result(run)
    assert losses == ref_losses  # no step repeated or skipped, bit-identical values
    assert set(weights) == set(ref_weights)
    assert all(np.array_equal(weights[k], ref_weights[k]) for k in weights)
    assert len(list(ckpts.glob("step-*"))) <= 2  # --keep-last 2
