"""`redi data generate --engine vllm` end to end with a real vLLM (vllm-cpu): the demo's stage-1 teacher on 20
held-out problems -> labelled traces -> `redi data pair` -> `redi train --stage pairs --max-steps 2`. Runs in
the second venv of .ci/run; skips where vllm is not installed. One engine start (~25 s)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/generate_chain.py

from generate_chain import check_chain, train_demo_teacher  # noqa: E402


def test_generate_pair_train_chain_vllm(tmp_path):
    teacher, problems = train_demo_teacher(tmp_path)
    report = check_chain(teacher, problems, tmp_path, "vllm")
    assert report["settings"]["engine"] == "vllm" and report["this_run"]["tokens_per_second"] > 0
