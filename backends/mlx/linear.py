"""Linear layers (and tied LM heads) whose weight gradient comes out row-major, as the weight is stored.

MLX differentiates ``x @ W.T`` through the transpose: the gradient is ``x.T @ dy`` transposed back, a
column-major view. Every pass the optimizer then makes over it (the clipping norm, AdamW) is strided against
the row-major weights and moments, and on a CPU that was 0.3 s of a 0.9 s short-row SmolLM2-135M optimizer
step (a copy to row-major costs as much again). A tied LM head's gradient is also added to the input lookup's
(row-major) one, a strided pass over [vocab x hidden]: 0.3 s of the same step's backward. Computing
``dy.T @ x`` instead writes the same product row-major: the same matmul, the other operand order.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def _weight_grad(x: mx.array, cotangent: mx.array) -> mx.array:
    return cotangent.reshape(-1, cotangent.shape[-1]).T @ x.reshape(-1, x.shape[-1])


@mx.custom_function
def linear(x: mx.array, weight: mx.array) -> mx.array:
    return x @ weight.T  # nn.Linear's forward, unchanged


@linear.vjp
def _linear_vjp(primals, cotangent, output):
    x, weight = primals
    return cotangent @ weight, _weight_grad(x, cotangent)


@mx.custom_function
def affine(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    return mx.addmm(bias, x, weight.T)


@affine.vjp
def _affine_vjp(primals, cotangent, output):
    x, weight, _ = primals
    return cotangent @ weight, _weight_grad(x, cotangent), cotangent.reshape(-1, cotangent.shape[-1]).sum(axis=0)


class RowMajorGradLinear(nn.Linear):
    """``nn.Linear`` with ``linear``'s backward (used only where the weight is trained: under LoRA the frozen
    base would pay for a weight gradient nobody asked for)."""

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return affine(x, self["weight"], self["bias"])
        return linear(x, self["weight"])


class RowMajorGradEmbedding(nn.Embedding):
    """``nn.Embedding`` whose ``as_linear`` (a tied LM head) has ``linear``'s backward."""

    def as_linear(self, x: mx.array) -> mx.array:
        return linear(x, self.weight)


SWAPS = {nn.Linear: RowMajorGradLinear, nn.Embedding: RowMajorGradEmbedding}


def install(model: nn.Module) -> int:
    """Swap every plain ``nn.Linear`` and ``nn.Embedding`` of ``model`` for the classes above, in place (the
    instances keep their weights); returns how many."""
    swapped = 0
    for _, module in model.named_modules():
        if type(module) in SWAPS:
            module.__class__ = SWAPS[type(module)]
            swapped += 1
    return swapped
