"""AdamW and gradient clipping with torch's exact arithmetic, over flat ``{name: array}`` dicts.

mlx.optimizers.AdamW would do with ``bias_correction=True``, but it takes no parameter groups and orders
the bias correction differently from torch; writing the dozen lines out keeps parity to a few fp32 ulps and
makes the no-decay grouping and the saved state (m, v, step) explicit.

Speed: each tensor's whole update (clip, decay, both moments, the step) is one ``mx.compile``d function, so on
a CPU it is one fused pass over the tensor instead of a dozen separate elementwise passes (the optimizer was
~40% of a short-row SmolLM2-135M step on mlx[cpu]); the scalars go in as arrays, so one trace serves every
step. The arithmetic is the uncompiled one, op for op. The squared norm of the change is a second fused pass
(new - old, squared) and a column sum: as a fourth output of the update it cost twice as much (measured on
a 28M tensor: 7.4 ns per entry against 5.1).
"""
from __future__ import annotations

import math
import os

import mlx.core as mx

from redi.backend import no_weight_decay
from redi.backends.mlx.logprobs import BLOCK, blocked_sum

Flat = dict[str, mx.array]
# Tensors updated (and evaluated) together: fewer host syncs than one at a time, while the transient copies
# (new weights and moments before the old ones are freed) stay within this many elements.
GROUP_ELEMENTS = 1 << 26
_STREAMS: list = []


def flat_sum(x: mx.array) -> mx.array:
    """The sum of a 1-D array, ``BLOCK`` terms at a time: a plain ``mx.sum`` over a 28M-entry embedding gradient
    comes out 3.5% low on the CPU (sequential fp32 accumulation), and that was the clipping coefficient
    (docs/real-model.md). The first level adds ``BLOCK`` rows of a [BLOCK, n / BLOCK] view column-wise: the same
    256-term partial sums as blocks of neighbours, at half the cost on a CPU (vectorised across columns)."""
    n = x.size
    whole = n - n % BLOCK
    if not whole:
        return x.sum()
    total = blocked_sum(x[:whole].reshape(BLOCK, -1).sum(axis=0))
    return total + x[whole:].sum() if whole < n else total


def sum_squares(t: mx.array) -> mx.array:
    return flat_sum(mx.square(t).reshape(-1))


_sum_squares = mx.compile(sum_squares)
# The paper's collapse signal is the norm of the change a step made to the weights.
_change_squares = mx.compile(lambda new, old: sum_squares(new - old))


def norm(t: mx.array) -> mx.array:
    return mx.sqrt(_sum_squares(t))


def streams() -> list:
    """Where the per-tensor optimizer work runs. On a GPU, its one stream. On a CPU (mlx[cpu]) MLX runs each
    stream's elementwise work on one thread, and the update is memory-bound, so one CPU stream per core (up
    to 4) runs it in parallel: 2 streams halved AdamW on 2 cores. Which stream a tensor takes changes nothing
    in its arithmetic."""
    if mx.default_device() != mx.cpu:
        return [mx.default_stream(mx.default_device())]
    if not _STREAMS:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        _STREAMS.extend([mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(min(cores, 4) - 1)])
    return _STREAMS


def spread(sizes: list[int], count: int) -> list[int]:
    """A stream for each tensor, biggest first to the least loaded (balanced elements per stream)."""
    load, out = [0] * count, [0] * len(sizes)
    for k in sorted(range(len(sizes)), key=lambda k: -sizes[k]):
        out[k] = min(range(count), key=load.__getitem__)
        load[out[k]] += sizes[k]
    return out


def global_norm(tensors: list[mx.array]) -> mx.array:
    # torch.nn.utils.clip_grad_norm_: the 2-norm of the per-tensor 2-norms.
    lanes = streams()
    norms = []
    for t, lane in zip(tensors, spread([t.size for t in tensors], len(lanes))):
        with mx.stream(lanes[lane]):
            norms.append(norm(t))
    return norm(mx.stack(norms))


def clip_coefficient(total_norm: mx.array, max_norm: float) -> mx.array:
    """clip_grad_norm_'s coefficient, max/(norm+1e-6) capped at 1 (1 when clipping is off)."""
    if max_norm <= 0:
        return mx.array(1.0, dtype=mx.float32)
    return mx.minimum(max_norm / (total_norm + 1e-6), 1.0)


def _adamw_math(param, grad, m, v, coef, keep, b1c, b2, b2c, step_size, bias2_sqrt, eps):
    """One tensor's step; returns (new weights, new m, new v in fp32)."""
    grad = grad * coef  # the clip (a coefficient of 1 changes nothing)
    new = param * keep  # decoupled weight decay (keep = 1 - lr * decay; 1 without decay)
    m = m + (grad - m) * b1c  # torch's lerp_ for weight < 0.5
    v = v * b2 + b2c * grad * grad  # addcmul_: (value * g) * g
    new = new - step_size * (m / (mx.sqrt(v) / bias2_sqrt + eps))
    return new, m, v


_adamw = mx.compile(_adamw_math)


class AdamW:
    """torch.optim.AdamW (betas .9/.999, eps 1e-8, decoupled decay, bias correction) on fp32 arrays."""

    def __init__(self, params: Flat, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, state_dtype: mx.Dtype = mx.float32):
        self.betas, self.eps, self.state_dtype = betas, eps, state_dtype
        self.decay = {k: 0.0 if no_weight_decay(k, p.ndim) else weight_decay for k, p in params.items()}
        # bf16 moments (the torch backend's optim_state_dtype: bf16): stored rounded, computed in fp32.
        self.m: Flat = {k: mx.zeros(p.shape, dtype=state_dtype) for k, p in params.items()}
        self.v: Flat = {k: mx.zeros(p.shape, dtype=state_dtype) for k, p in params.items()}
        self.step = 0

    def begin_step(self) -> None:
        self.step += 1

    def update_one(self, name: str, param: mx.array, grad: mx.array, lr: float,
                   coef: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """One tensor's update (call ``begin_step`` once per step first): the new weights and the sum of squares
        of the change. Per tensor so the caller can evaluate and release as it goes, keeping peak memory near
        torch's in-place update. ``coef`` is the clipping coefficient (None: 1)."""
        b1, b2 = self.betas
        # The same Python-float scalars torch computes (in double) before they meet fp32 tensors.
        scalars = (1.0 if coef is None else coef, 1 - lr * self.decay[name], 1 - b1, b2, 1 - b2,
                   lr / (1 - b1 ** self.step), math.sqrt(1 - b2 ** self.step), self.eps)
        scalars = [s if isinstance(s, mx.array) else mx.array(s, dtype=mx.float32) for s in scalars]
        m, v = self.m[name].astype(mx.float32), self.v[name].astype(mx.float32)
        new, m, v = _adamw(param, grad, m, v, *scalars)
        self.m[name], self.v[name] = m.astype(self.state_dtype), v.astype(self.state_dtype)
        return new, _change_squares(new, param)

    def state(self) -> tuple[Flat, dict[str, str]]:
        arrays = {f"m.{k}": v for k, v in self.m.items()} | {f"v.{k}": v for k, v in self.v.items()}
        return arrays, {"step": str(self.step), "betas": f"{self.betas[0]},{self.betas[1]}", "eps": str(self.eps)}

    def load(self, arrays: Flat, metadata: dict[str, str]) -> None:
        missing = [k for k in self.m if f"m.{k}" not in arrays or f"v.{k}" not in arrays]
        if missing:
            raise KeyError(f"optimizer state lacks {missing[:3]}")
        self.m = {k: arrays[f"m.{k}"].astype(self.state_dtype) for k in self.m}
        self.v = {k: arrays[f"v.{k}"].astype(self.state_dtype) for k in self.v}
        self.step = int(metadata.get("step", "0"))
