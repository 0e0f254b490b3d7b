"""Generation engines: stop-token resolution, end-of-turn stops, and the native sampler's continuous batching.
The vLLM engine's tests are in tests/vllm_engine/ (they need the second venv, see .ci/run)."""
from __future__ import annotations

import json
import shutil

import pytest

from redi.evaluation.engines import NativeEngine, make_engine, stop_token_ids


def test_stop_ids_are_eos_im_end_and_generation_config(tiny_model_dir, tiny_tokenizer, tmp_path):
    eos = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos != im_end
    assert stop_token_ids(tiny_tokenizer, tiny_model_dir) == sorted({eos, im_end})
    # generation_config may list more ids (Qwen2.5-Instruct lists 151645 and 151643): all of them stop.
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 7, 9]}))
    assert stop_token_ids(tiny_tokenizer, model) == sorted({eos, im_end, 7, 9})


@pytest.fixture(scope="module")
def im_end_engine(im_end_model_dir):
    return make_engine("native", im_end_model_dir, backend="cpu")


def test_native_engine_stops_at_im_end(im_end_engine, im_end_model_dir):
    tok = im_end_engine.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stops = stop_token_ids(tok, im_end_model_dir)
    out = im_end_engine.generate(["1+1=", [5, 6, 7]], n=2, temperature=0.6, top_p=0.95, max_new_tokens=16, seed=0,
                                 stop_token_ids=stops)
    assert [len(row) for row in out] == [2, 2]
    for c in (c for row in out for c in row):
        assert c.token_ids == [im_end] and c.finish_reason == "stop" and c.text == ""
    # The old rule (EOS only) runs this model to the length limit: the stop ids are what ends the turn.
    eos_only = im_end_engine.backend.generate([[5, 6, 7]], max_new_tokens=16, temperature=0.6, top_p=0.95, seed=0,
                                              eos_id=tok.eos_token_id)
    assert eos_only == [[im_end] * 16]


@pytest.fixture(scope="module")
def cpu_backend(tiny_model_dir):
    from redi.backend import make_backend

    backend = make_backend("cpu", 0)
    backend.load(tiny_model_dir, precision="fp32", lm_head_chunk=1024)
    return backend


PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14], [15, 16], [17, 18, 19, 20], [21, 22, 23, 24, 25, 26, 27, 28, 29]]


def test_continuous_batching_gives_each_prompt_its_own_greedy_answer(cpu_backend):
    """Greedy decoding of a prompt does not depend on its neighbours: with 2 slots refilled as rows finish,
    every output equals that prompt generated alone (an independent run per prompt)."""
    alone = [cpu_backend.generate([p], max_new_tokens=10, temperature=0.0, top_p=1.0, seed=0, eos_id=0)[0]
             for p in PROMPTS]
    # A stop id that ends some rows early and not others, so slots free up at different steps.
    firsts = sorted({row[2] for row in alone})
    stop = firsts[0]
    expected = [row[:row.index(stop) + 1] if stop in row else row for row in alone]
    assert len({len(row) for row in expected}) > 1, "the test needs rows of different lengths"
    got = cpu_backend.generate(PROMPTS, max_new_tokens=10, temperature=0.0, top_p=1.0, seed=0, eos_id=0,
                               stop_ids=[stop], batch_size=2)
    assert got == expected


def test_a_straggler_does_not_hold_the_batch(cpu_backend):
    """Count real forward passes: with slots refilled, the model runs about sum(lengths) / slots decode
    steps plus one prefill per admission, fewer than a static batch that waits for its longest row."""
    calls = []
    hook = cpu_backend.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        alone = [cpu_backend.generate([p], max_new_tokens=12, temperature=0.0, top_p=1.0, seed=0, eos_id=0)[0]
                 for p in PROMPTS]
        stop = alone[0][1]  # prompt 0 stops after 2 tokens; the others run longer or to the limit
        lengths = [row.index(stop) + 1 if stop in row else 12 for row in alone]
        calls.clear()
        cpu_backend.generate(PROMPTS, max_new_tokens=12, temperature=0.0, top_p=1.0, seed=0, eos_id=0,
                             stop_ids=[stop], batch_size=3)
    finally:
        hook.remove()
    static = sum(max(lengths[i:i + 3]) for i in range(0, len(PROMPTS), 3))  # one forward per token of the longest
    assert len(calls) < static, (len(calls), static, lengths)


def test_native_engine_n_samples_are_prompt_major(cpu_backend, tiny_tokenizer, tiny_model_dir):
    engine = NativeEngine(cpu_backend, tiny_tokenizer, batch_size=4)
    out = engine.generate([[5, 6, 7], [8, 9]], n=3, temperature=0.0, top_p=1.0, max_new_tokens=6, seed=0,
                          stop_token_ids=stop_token_ids(tiny_tokenizer, tiny_model_dir))
    assert [len(r) for r in out] == [3, 3]
    # Greedy: all three samples of a prompt are that prompt's greedy answer.
    for prompt, row in zip([[5, 6, 7], [8, 9]], out):
        alone = cpu_backend.generate([prompt], max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0,
                                     eos_id=tiny_tokenizer.eos_token_id,
                                     stop_ids=stop_token_ids(tiny_tokenizer, tiny_model_dir))[0]
        assert all(c.token_ids == alone for c in row)
        assert all(c.text == tiny_tokenizer.decode(alone, skip_special_tokens=True) for c in row)


def _samples_of(backend, seed: int, monkeypatch=None, share_prefill: bool = True) -> tuple[list, list]:
    """(outputs, the batch shape of each forward) for 3 prompts x 4 samples, prompt-major, at T = 1."""
    import functools

    from redi.backends.torch_cuda import backend as torch_backend
    from redi.backends.torch_cuda.generate import generate as generate_rows

    if not share_prefill:
        monkeypatch.setattr(torch_backend, "generate_rows", functools.partial(generate_rows, share_prefill=False))
    shapes = []
    hook = backend.model.register_forward_hook(lambda _m, args, kwargs, _out: shapes.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        flat = [p for p in PROMPTS[:3] for _ in range(4)]
        out = backend.generate(flat, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=seed, eos_id=0)
    finally:
        hook.remove()
    return out, shapes


def test_torch_engine_prefills_equal_prompts_once_and_draws_the_unshared_samples(cpu_backend, monkeypatch):
    """The n samples of a prompt share its prefill: one prefill row per distinct prompt, and the same draws as
    a prefill of every row with the same seed (the rows are copied before anything is drawn)."""
    shared, shapes = _samples_of(cpu_backend, seed=3)
    assert shapes[0] == (3, 6)  # 3 distinct prompts, the longest has 6 tokens; then decode steps
    assert all(width == 1 for _, width in shapes[1:])
    unshared, unshared_shapes = _samples_of(cpu_backend, 3, monkeypatch, share_prefill=False)
    assert unshared_shapes[0] == (12, 6)
    assert shared == unshared
    assert shared == _samples_of(cpu_backend, seed=3)[0]
    assert shared != _samples_of(cpu_backend, seed=4)[0]
    for i in range(3):  # T > 0: the samples of one prompt are not copies of each other
        assert len({tuple(s) for s in shared[i * 4:(i + 1) * 4]}) == 4


def test_unknown_engine_is_a_user_error(tiny_model_dir):
    from redi.errors import UserError

    with pytest.raises(UserError, match="valid engines: vllm, native"):
        make_engine("tgi", tiny_model_dir)
