"""SIGKILL and resume with LoRA (issue 17): tests/test_resume_kill.py's pattern with DoRA adapters on the CPU;
the resumed run's losses, adapter and merged final model are bit-identical to an uninterrupted run's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# Both stages, 6 steps each, a checkpoint every 2 steps; DoRA (the adapter with the most state: A, B and m).
KILL_ARGS = ["--config", str(TINY), "--stage", "both", "--set", "sft.max_steps=6", "--set", "pairs.max_steps=6",
             "--save-every", "2", "--keep-last", "2", "--set", "lora_rank=4", "--set", "lora_scale=8.0",
             "--set", "lora_dora=true"]


def _kill_cmd(out: Path, resume: bool = False):
    base = [sys.executable, "-m", "redi", "train", "--backend", "cpu"]
    return base + (["--resume", str(out)] if resume else KILL_ARGS + ["--output", str(out)])


def _kill_env(**extra):
    return _env(OMP_NUM_THREADS="1", **extra)  # one thread: tiny model, busy 2-core CI box


def _kill_result(run: Path):
    from safetensors.numpy import load_file

    losses = [r["loss"] for r in _metrics(run)]
    return losses, load_file(str(run / "final" / "adapter" / "adapter_model.safetensors")), \
        load_file(str(run / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-kill-ref") / "run"
    proc = subprocess.run(_kill_cmd(out), env=_kill_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return _kill_result(out)


def test_sigkill_during_a_stage_2_checkpoint_then_resume_is_bit_identical(kill_reference, tmp_path):
    """tests/test_resume_kill.py's pattern with DoRA adapters, killed while step-10 (stage 2) is being written:
    resume = sft_final + the step-8 adapter + its AdamW state."""
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # The 4th checkpoint (step-10) dies after its files are written and before its rename (redi.atomic).
    killed = subprocess.run(_kill_cmd(run), env=_kill_env(REDI_KILL_AT="checkpoint@4"), capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert not (ckpts / "step-10").exists() and (ckpts / "step-8").exists()
    assert any(p.name.startswith(".step-10.tmp-") for p in ckpts.iterdir())
    assert {p.name for p in (ckpts / "step-8").iterdir()} == {"adapter_model.safetensors", "adapters.safetensors",
                                                             "adapter_config.json", "optimizer.pt", "trainer_state.json"}
    resumed = subprocess.run(_kill_cmd(run, resume=True), env=_kill_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    (losses, adapter, merged), (ref_losses, ref_adapter, ref_merged) = _kill_result(run), kill_reference
    assert losses == ref_losses and len(losses) == 12  # no step repeated or skipped, bit-identical values
    assert set(adapter) == set(ref_adapter) and all(np.array_equal(adapter[k], ref_adapter[k]) for k in adapter)
    assert set(merged) == set(ref_merged) and all(np.array_equal(merged[k], ref_merged[k]) for k in merged)
