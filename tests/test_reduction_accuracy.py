"""Reductions over a real vocabulary: the torch<->MLX gap on SmolLM2 (docs/real-model.md) came from sums
that the toy models' 259-token vocabularies are too small to show. Checked against float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from redi.backends.torch_cuda.optim import tensor_norms

VOCAB, HIDDEN = 49_152, 576  # SmolLM2's tied embedding: 28M entries in one gradient


def _embedding_gradient() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((VOCAB, HIDDEN)) * 1e-2).astype(np.float32)


def test_torch_cpu_norm_of_a_big_tensor_is_exact():
    g = _embedding_gradient()
    want = np.sqrt((g.astype(np.float64) ** 2).sum())
    assert float(tensor_norms([torch.from_numpy(g)])[0]) == pytest.approx(want, rel=1e-6)


def test_mlx_norm_and_logsumexp_over_a_real_vocabulary_are_exact():
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    from redi.backends.mlx.logprobs import logsumexp
    from redi.backends.mlx.optim import norm

    g = _embedding_gradient()
    assert float(norm(mx.array(g))) == pytest.approx(np.sqrt((g.astype(np.float64) ** 2).sum()), rel=1e-6)
    logits = (np.random.default_rng(1).standard_normal((8, VOCAB)) * 3).astype(np.float32)
    want = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(np.array(logsumexp(mx.array(logits))), want, atol=3e-6, rtol=0)
    z = mx.array(logits[:, :1000])  # same gradient as mx.logsumexp: the softmax
    np.testing.assert_allclose(np.array(mx.grad(lambda x: logsumexp(x).sum())(z)),
                               np.array(mx.grad(lambda x: mx.logsumexp(x, axis=-1).sum())(z)), rtol=1e-5, atol=1e-7)


def test_torch_cpu_update_norm_of_a_big_tensor_is_exact():
    """The update norm (the paper's collapse signal) went through ``torch._foreach_norm``, 1.7e-3 low here."""
    from redi.backends.torch_cuda.distributed import Dist
    from redi.backends.torch_cuda.optim import step_with_norms

    g = _embedding_gradient()
    w = torch.nn.Parameter(torch.zeros(g.shape))
    w.grad = torch.from_numpy(g)
    opt = torch.optim.SGD([w], lr=1.0)  # the change is exactly -g
    got = step_with_norms(opt, [w], Dist("cpu"), None)
    assert got == pytest.approx(np.sqrt((g.astype(np.float64) ** 2).sum()), rel=1e-6)


@pytest.mark.parametrize("numel", [1, 1023, 1024, 5000])
def test_torch_cpu_norm_of_ragged_tensors(numel):
    t = torch.from_numpy(np.random.default_rng(numel).standard_normal(numel).astype(np.float32))
    assert float(tensor_norms([t])[0]) == pytest.approx(float(t.double().norm()), rel=1e-6)
