"""The MLX optimizer step's layout and reductions (issue 26): weight gradients come out row-major like the
weights (a strided gradient made the clipping norm and AdamW 0.3 s slower per SmolLM2-135M step on mlx[cpu]),
they equal plain ``nn.Linear``'s, and the column-wise sums stay as exact as float64 says."""
from __future__ import annotations

import numpy as np
import pytest

import redi.backends.mlx  # noqa: F401 - preloads OpenBLAS (when installed) before mlx.core

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx.utils import tree_flatten  # noqa: E402

from redi.backends.mlx import checkpointing, linear  # noqa: E402
from redi.backends.mlx.backend import MLXBackend  # noqa: E402
from redi.backends.mlx.optim import flat_sum, norm  # noqa: E402

pytestmark = pytest.mark.mlx


def _grads(model, ids, loss_of=None):
    loss = nn.value_and_grad(model, loss_of or (lambda m: (m(ids).astype(mx.float32) ** 2).mean()))
    _, grads = loss(model)
    grads = dict(tree_flatten(grads))
    mx.eval(grads)
    return grads


@pytest.mark.parametrize("bias", [False, True])
def test_row_major_linear_gives_nn_linears_output_and_gradients(bias):
    mx.random.seed(0)
    plain = nn.Sequential(nn.Linear(48, 80, bias=bias), nn.SiLU(), nn.Linear(80, 32, bias=bias))
    swapped = nn.Sequential(nn.Linear(48, 80, bias=bias), nn.SiLU(), nn.Linear(80, 32, bias=bias))
    swapped.update(plain.parameters())
    assert linear.install(swapped) == 2 and linear.install(plain.layers[1]) == 0
    x = mx.random.normal((3, 7, 48))
    np.testing.assert_array_equal(np.array(swapped(x)), np.array(plain(x)))  # the forward is nn.Linear's
    want, got = _grads(plain, x), _grads(swapped, x)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    weights = [k for k in want if k.endswith("weight")]
    assert all(memoryview(got[k]).c_contiguous for k in weights)
    assert not any(memoryview(want[k]).c_contiguous for k in weights)  # what the swap is for


def test_tied_head_gradient_is_row_major_and_unchanged():
    mx.random.seed(1)
    plain, swapped = nn.Embedding(50, 24), nn.Embedding(50, 24)
    swapped.update(plain.parameters())
    assert linear.install(swapped) == 1
    ids, h = mx.array([[3, 7, 7, 49]]), mx.random.normal((1, 4, 24))

    def loss(m):  # the lookup and the tied head, as a tied LM does
        return (m.as_linear(m(ids) + h) ** 2).mean()

    want, got = _grads(plain, None, loss)["weight"], _grads(swapped, None, loss)["weight"]
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-7)
    assert memoryview(got).c_contiguous


def test_backend_grads_are_row_major_under_full_training_only(tiny_model_dir):
    from redi.lora import LoraSpec

    full = MLXBackend()
    full.load(tiny_model_dir)
    assert all(type(m) not in linear.SWAPS for _, m in full.model.named_modules())
    grads = _grads(full.model, mx.array([[1, 5, 9, 2, 6]]))
    assert all(memoryview(g).c_contiguous for k, g in grads.items() if g.ndim == 2), "a strided weight gradient"
    adapters = MLXBackend(lora=LoraSpec(rank=2))
    adapters.load(tiny_model_dir)  # the frozen base must not pay for a weight gradient
    assert not any(isinstance(m, tuple(linear.SWAPS.values())) for _, m in adapters.model.named_modules())


@pytest.mark.parametrize("n", [1, 255, 256, 257, 576, 1000, 70_000, 3_000_001])
def test_flat_sum_and_norm_are_exact_on_ragged_sizes(n):
    x = (np.random.default_rng(n).standard_normal(n) * 1e-2).astype(np.float32)
    # A signed sum cancels: its error is measured against the sum of magnitudes (sequential fp32: ~n * 6e-8).
    magnitude = np.abs(x.astype(np.float64)).sum()
    assert float(flat_sum(mx.array(x))) == pytest.approx(x.astype(np.float64).sum(), abs=1e-7 * magnitude)
    assert float(norm(mx.array(x))) == pytest.approx(np.sqrt((x.astype(np.float64) ** 2).sum()), rel=1e-6)


def test_cpu_cache_limit_is_raised_not_lowered():
    if mx.metal.is_available():
        pytest.skip("Metal's cache limit is already the memory limit")
    before = mx.set_cache_limit(32 << 20)
    try:
        checkpointing.keep_freed_buffers(1 << 29)  # two steps' turnover
        assert mx.set_cache_limit(3 << 30) == 1 << 30
        checkpointing.keep_freed_buffers(1 << 28)  # a smaller step leaves a larger limit alone
        assert mx.set_cache_limit(3 << 30) == 3 << 30
    finally:
        mx.set_cache_limit(before)
