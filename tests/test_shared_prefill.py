"""The MLX engine's generation speed-ups keep its output (issue 26, item 5): the n samples of a prompt share one
prefill, and nucleus sampling sorts only the most likely tokens when they hold top-p of the mass.

Shared prefill: greedy samples are each the prompt generated alone (exact ids); sampled ones are the samples of
an unshared prefill with the same seed, reproducible for a seed, and differ between the samples of a prompt.
Nucleus: the filtered distribution equals a sort of the whole vocabulary (the sampler before this change), on
both of its branches.
"""
from __future__ import annotations

import pytest

import redi.backends.mlx  # noqa: F401 - preloads OpenBLAS (when installed) before mlx.core

mx = pytest.importorskip("mlx.core")

from redi.backends.mlx import generate as mlx_generate  # noqa: E402
from redi.backends.mlx.backend import MLXBackend  # noqa: E402
from redi.evaluation.engines import NativeEngine, stop_token_ids  # noqa: E402

pytestmark = pytest.mark.mlx
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
N = 4


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    b = MLXBackend()
    b.load(tiny_model_dir)
    return b


class RecordingModel:
    """The model, recording the batch shape of every call (the first call of a run is the prefill)."""

    def __init__(self, model):
        self.model, self.layers, self.shapes = model, model.layers, []

    def __call__(self, ids, cache):
        self.shapes.append(tuple(ids.shape))
        return self.model(ids, cache=cache)


def _run(model, temperature: float, seed: int = 0, top_p: float = 0.9, **kw) -> list[list[int]]:
    flat = [p for p in PROMPTS for _ in range(N)]  # prompt-major, as NativeEngine passes the n samples
    return mlx_generate.generate_batch(model, flat, max_new_tokens=10, temperature=temperature, top_p=top_p,
                                       key=mx.random.key(seed), eos_id=-1, **kw)


def test_equal_prompts_are_prefilled_once(backend):
    shared, unshared = RecordingModel(backend.model), RecordingModel(backend.model)
    _run(shared, 1.0)
    _run(unshared, 1.0, share_prefill=False)
    # Prefill: one call per prompt, all but its last token (the first decode step feeds that one).
    prefills = [(1, len(p) - 1) for p in PROMPTS]
    assert shared.shapes[:len(PROMPTS)] == prefills
    assert unshared.shapes[:len(PROMPTS) * N] == [shape for shape in prefills for _ in range(N)]
    # Then every sample decodes its own row: 10 tokens, and one step queued before the last tokens were read.
    assert shared.shapes[len(PROMPTS):] == [(len(PROMPTS) * N, 1)] * 11


def test_greedy_samples_are_each_the_prompt_generated_alone(backend, tiny_model_dir, tiny_tokenizer):
    stops = stop_token_ids(tiny_tokenizer, tiny_model_dir)
    out = NativeEngine(backend, tiny_tokenizer).generate(PROMPTS, n=N, temperature=0.0, top_p=1.0,
                                                          max_new_tokens=12, seed=0, stop_token_ids=stops)
    for prompt, samples in zip(PROMPTS, out):
        alone = backend.generate([prompt], max_new_tokens=12, temperature=0.0, top_p=1.0, seed=0, eos_id=stops[0],
                                 stop_ids=stops)[0]
        assert [c.token_ids for c in samples] == [alone] * N


def test_sampled_samples_are_the_unshared_ones_and_seeded(backend):
    shared = _run(backend.model, 1.0, seed=3)
    assert shared == _run(backend.model, 1.0, seed=3, share_prefill=False)
    assert shared == _run(backend.model, 1.0, seed=3)
    assert shared != _run(backend.model, 1.0, seed=4)
    for i in range(len(PROMPTS)):  # T > 0: the samples of one prompt are not copies of each other
        samples = shared[i * N:(i + 1) * N]
        assert len({tuple(s) for s in samples}) == N, samples


def _full_sort_nucleus(scaled: mx.array, top_p: float) -> mx.array:
    """The sampler's filtered distribution before the candidates: sort all tokens, keep those whose more likely
    tokens hold less than top_p, scattered back to vocabulary order."""
    probs = mx.softmax(scaled, axis=-1)
    order = mx.argsort(-probs, axis=-1)
    sorted_p = mx.take_along_axis(probs, order, axis=-1)
    kept = mx.where(mx.cumsum(sorted_p, axis=-1) - sorted_p < top_p, sorted_p, 0.0)
    return mx.put_along_axis(mx.zeros_like(probs), order, kept, axis=-1)


@pytest.mark.parametrize("flat_row", [False, True], ids=["candidates", "whole-vocabulary"])
def test_nucleus_is_the_full_sort_nucleus(monkeypatch, flat_row):
    monkeypatch.setattr(mlx_generate, "NUCLEUS_CANDIDATES", 16)
    vocab, top_p = 512, 0.9
    scaled = mx.random.normal((3, vocab), key=mx.random.key(0)) * 6.0  # peaked: 0.9 of the mass in 3-6 tokens
    if flat_row:  # a near-uniform row: its 16 most likely tokens hold ~3%, so the nucleus reaches beyond them
        scaled = mx.concatenate([scaled, mx.random.normal((1, vocab), key=mx.random.key(1)) * 0.01])
    ids, p = mlx_generate._nucleus(scaled, top_p)
    assert ids.shape[-1] == (vocab if flat_row else 16)  # the branch this case is for
    got = mx.put_along_axis(mx.zeros_like(scaled), ids, p, axis=-1)
    want = _full_sort_nucleus(scaled, top_p)
    assert mx.allclose(got, want, rtol=1e-6, atol=0).item()
    assert mx.array_equal(got > 0, want > 0).item()  # the same tokens are drawable
    kept = mx.sum(want > 0, axis=-1).tolist()
    assert all(2 < k < 16 for k in kept[:3]) and (not flat_row or kept[3] > 400), kept


@pytest.mark.parametrize("batch_size", [64, 5], ids=["one-batch", "refilled"])
def test_a_step_whose_candidates_fall_short_is_undone_and_redrawn(backend, monkeypatch, batch_size):
    """The decode loop queues step t+1 before it reads step t's check. With 4 candidates and top_p 0.999 every
    step's candidates fall short: each step's cache write must be undone and the step redrawn from the whole
    vocabulary, giving exactly the run that never used candidates (the same keys, rows and draws), also while
    rows stop at different steps and their slots are refilled."""
    stops = dict(stop_ids=[i for i in range(0, 400, 3)], batch_size=batch_size)  # rows stop at different steps
    without, with_short = RecordingModel(backend.model), RecordingModel(backend.model)
    monkeypatch.setattr(mlx_generate, "NUCLEUS_CANDIDATES", 10**9)
    want = _run(without, 1.0, seed=5, top_p=0.999, **stops)
    monkeypatch.setattr(mlx_generate, "NUCLEUS_CANDIDATES", 4)
    got = _run(with_short, 1.0, seed=5, top_p=0.999, **stops)
    assert len({len(ids) for ids in want}) > 2, "rows must stop at different steps"
    assert len(with_short.shapes) > len(without.shapes)  # the redraws ran: one more decode call per step
    assert got == want
