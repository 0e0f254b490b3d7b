"""Multi-process training on the CPU: torchrun, gloo, FSDP2 ``fully_shard``.

2 processes against 1 with the same global batch give the same losses for 5 steps (1e-5), including a
step whose micro-batches do not split evenly over the ranks (one rank repeats one with weight 0); only
rank 0 writes the run folder; the final model, gathered from the shards, matches the one-process model.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from redi.training.api import train  # noqa: E402
from redi.config import apply_overrides, load_config  # noqa: E402
from redi.training.ranks import rank_share  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _overrides(model_dir: str, out: Path, stage: str) -> list[str]:
    # 6 pairs per step in micro-batches of 2: 3 micro-batches, split 2 + 1 (+ a zero-weight repeat) over 2 ranks.
    # packing=true: torchrun always packs, so one process must too (on a CPU auto pads, a different rounding).
    return [f"model={model_dir}", f"output={out}", "backend=cpu", f"stage={stage}", "packing=true", "pairs.batch_size=6",
            "pairs.micro_batch_size=2", "pairs.max_steps=5", "pairs.learning_rate=3e-3", "pairs.warmup_ratio=0",
            "sft.batch_size=6", "sft.micro_batch_size=2", "sft.max_steps=5", "sft.warmup_ratio=0"]


SCRIPT = textwrap.dedent("""
    import sys
    from redi.training.api import train
    from redi.config import apply_overrides, load_config
    cfg = apply_overrides(load_config(sys.argv[1]), sys.argv[2:])
    train(cfg)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rank_share_covers_each_micro_batch_once():
    import dataclasses

    @dataclasses.dataclass
    class MB:  # a MicroBatch stand-in: rank_share only replaces the weight
        name: str
        weight: float = 1.0

    mbs = [MB(x) for x in "abcde"]
    shares = [rank_share(mbs, r, 2) for r in range(2)]
    assert [len(s) for s in shares] == [3, 3]
    real = sorted(i for s in shares for i, _ in s if i >= 0)
    assert real == [0, 1, 2, 3, 4]
    pads = [b for s in shares for i, b in s if i < 0]
    assert len(pads) == 1 and pads[0].weight == 0.0
    assert rank_share(mbs, 0, 1) == list(enumerate(mbs))


@pytest.mark.parametrize("stage", ["pairs"])
def test_two_processes_match_one(tmp_path, tiny_model_dir, stage):
    one = tmp_path / "one"
    train(apply_overrides(load_config(TINY), _overrides(tiny_model_dir, one, stage)))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def torchrun(out: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), str(script), str(TINY), *_overrides(tiny_model_dir, out, stage),
               "activation_checkpointing=full"]  # FSDP2 with recomputed layers, against no recomputation
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    two = tmp_path / "two"
    proc = torchrun(two)
    if proc.returncode != 0 and "SIGABRT" in proc.stderr:
        # Seen once (a clean-clone .ci/run on the 2-core box, 2026-12-07): a rank aborted inside torchrun/gloo;
        # the same test passed in the other clean-clone run and 6 local runs. One fresh try, new port and folder.
        two = tmp_path / "two-again"
        proc = torchrun(two)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 5
    np.testing.assert_allclose(l2, l1, atol=1e-5, rtol=0)
    assert l1[-1] != l1[0]  # the model trained, so matching losses mean matching updates
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in m1] == [r["tokens"] for r in m2]
    np.testing.assert_allclose([r["grad_norm"] for r in m2], [r["grad_norm"] for r in m1], rtol=1e-4)
    np.testing.assert_allclose([r["update_norm"] for r in m2], [r["update_norm"] for r in m1], rtol=1e-3)
    # The final model: gathered from both shards, written once, loadable, equal to the one-process model.
    from safetensors.numpy import load_file

    w1, w2 = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert set(w1) == set(w2)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], atol=1e-5, rtol=0, err_msg=k)
    assert (two / "summary.json").exists() and not list(two.glob(".tmp-*"))
