"""The vLLM engine with a real vLLM (vllm-cpu on a CPU box): `redi eval --engine vllm` end to end, and the
end-of-turn stop. Runs in the second venv of .ci/run; skips where vllm is not installed (the main venv).
Each engine start costs ~25 s here, so there are two: one CLI run and one in-process engine."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from redi.evaluation.engines import make_engine, stop_token_ids  # noqa: E402

SAMPLE_KEYS = {"benchmark", "id", "sample", "response", "answer", "finish_reason", "tokens", "correct",
               "format_error", "extracted"}


def _run(*args):
    return subprocess.run([sys.executable, "-m", "redi", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_redi_eval_with_vllm_matches_the_native_schema_and_regrades(tmp_path, vllm_model_dir):
    common = ("--model", vllm_model_dir, "--benchmark", "math500", "--limit", "3", "--samples", "2",
              "--max-new-tokens", "24", "--workers", "1")
    proc = _run("eval", *common, "--engine", "vllm", "--output", str(tmp_path / "vllm"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    native = _run("eval", *common, "--engine", "native", "--backend", "cpu", "--output", str(tmp_path / "native"))
    assert native.returncode == 0, native.stderr[-3000:]
    rows = {e: [json.loads(x) for x in (tmp_path / e / "samples.jsonl").read_text().splitlines()]
            for e in ("vllm", "native")}
    assert len(rows["vllm"]) == 6 and {(r["id"], r["sample"]) for r in rows["vllm"]} == \
        {(r["id"], r["sample"]) for r in rows["native"]}
    for r in rows["vllm"] + rows["native"]:
        assert set(r) == SAMPLE_KEYS
        assert r["finish_reason"] in ("stop", "length") and 0 < r["tokens"] <= 24
        assert r["response"].startswith("<think>\n")
    results = json.loads((tmp_path / "vllm" / "results.json").read_text())["math500"]
    assert results["grader"] == "rllm" and results["problems"] == 3 and results["samples"] == 6
    graded = _run("grade", str(tmp_path / "vllm" / "samples.jsonl"), "--grader", "rllm", "--json", "--workers", "1")
    assert graded.returncode == 0, graded.stderr
    regraded = json.loads(graded.stdout)
    for key in ("pass@1", "pass@2", "sem", "problems", "samples", "format_errors"):
        assert regraded[key] == results[key], key


@pytest.fixture(scope="module")
def im_end_vllm(vllm_im_end_model_dir):
    engine = make_engine("vllm", vllm_im_end_model_dir)
    yield engine
    engine.close()


def test_vllm_stops_at_im_end(im_end_vllm, vllm_im_end_model_dir):
    tok = im_end_vllm.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.eos_token_id
    out = im_end_vllm.generate(["1+1=", [5, 6, 7]], n=2, temperature=0.6, top_p=0.95, max_new_tokens=16, seed=0,
                               stop_token_ids=stop_token_ids(tok, vllm_im_end_model_dir))
    assert [len(row) for row in out] == [2, 2]
    for c in (c for row in out for c in row):
        assert c.token_ids == [im_end] and c.finish_reason == "stop" and c.text == ""
    # Without the stop ids vLLM stops at EOS only and this model runs to the limit: the ids are what stop it.
    long = im_end_vllm.generate([[5, 6, 7]], n=1, temperature=0.6, top_p=0.95, max_new_tokens=16, seed=0,
                                stop_token_ids=[tok.eos_token_id])
    assert long[0][0].token_ids == [im_end] * 16 and long[0][0].finish_reason == "length"
