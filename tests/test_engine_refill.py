"""Continuous batching must not change what a row generates: greedy outputs are the same whether a finished
row's slot is refilled mid-run (batch 3) or every row runs at once (batch 64). Found through `redi data
generate`: refilling appended each running row's pending token a second time ("\\boxxed{17755}")."""
from __future__ import annotations

import pytest
from conftest import available_backends

from redi.evaluation.engines import make_engine
from redi.training.api import load_tokenizer

PROMPTS = ["1+1=", "What is 12 times 3?", "x", "Solve: 7*8-5", "hello there", "ab", "The answer is"]


_backends = available_backends


@pytest.mark.parametrize("backend", _backends())
def test_refilled_slots_generate_what_a_full_batch_does(tiny_model_dir, backend):
    tokenizer = load_tokenizer(tiny_model_dir)
    stops = [i for i in range(len(tokenizer.get_vocab())) if i % 3 == 0]  # rows stop at different steps
    outputs = {}
    for batch_size in (64, 3):  # 3: the two samples of a prompt (identical at T = 0) and one other
        engine = make_engine("native", tiny_model_dir, backend=backend, tokenizer=tokenizer, batch_size=batch_size)
        outs = engine.generate(PROMPTS, n=2, temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0,
                               stop_token_ids=stops)
        outputs[batch_size] = [[c.token_ids for c in per_prompt] for per_prompt in outs]
    lengths = {len(ids) for per_prompt in outputs[64] for ids in per_prompt}
    assert len(lengths) > 2, f"rows must finish at different steps for slots to be refilled: {lengths}"
    assert outputs[3] == outputs[64]
