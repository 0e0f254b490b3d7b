"""AdamW and gradient clipping with torch's exact arithmetic, over flat ``{name: array}`` dicts.

mlx.optimizers.AdamW would do with ``bias_correction=True``, but it takes no parameter groups and orders
the bias correction differently from torch; writing the dozen lines out keeps parity to a few fp32 ulps and
makes the no-decay grouping and the saved state (m, v, step) explicit.
"""
from __future__ import annotations

import math

import mlx.core as mx

from redi.backend import no_weight_decay
from redi.backends.mlx.logprobs import blocked_sum

Flat = dict[str, mx.array]


def norm(t: mx.array) -> mx.array:
    """The 2-norm, summed in blocks: a plain ``mx.sum`` over a 28M-entry embedding gradient comes out 3.5%
    low on the CPU (sequential fp32 accumulation), and that was the clipping coefficient (docs/real-model.md)."""
    return mx.sqrt(blocked_sum(mx.square(t).reshape(-1)))


def global_norm(tensors: list[mx.array]) -> mx.array:
    # torch.nn.utils.clip_grad_norm_: the 2-norm of the per-tensor 2-norms.
    return norm(mx.stack([norm(t) for t in tensors]))


def clip_by_global_norm(grads: Flat, max_norm: float) -> tuple[Flat, mx.array]:
    """Scale gradients like clip_grad_norm_ (coefficient max/(norm+1e-6), capped at 1); returns the pre-clip norm."""
    norm = global_norm(list(grads.values()))
    if max_norm <= 0:
        return grads, norm
    coef = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return {k: g * coef for k, g in grads.items()}, norm


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

    def update_one(self, name: str, param: mx.array, grad: mx.array, lr: float) -> mx.array:
        """One tensor's update (call ``begin_step`` once per step first); per tensor so the caller can
        evaluate and release as it goes, keeping peak memory near torch's in-place update."""
        b1, b2 = self.betas
        # The same Python-float scalars torch computes (in double) before they meet fp32 tensors.
        step_size = lr / (1 - b1 ** self.step)
        bias2_sqrt = math.sqrt(1 - b2 ** self.step)
        if self.decay[name] != 0:
            param = param * (1 - lr * self.decay[name])
        m, v = self.m[name].astype(mx.float32), self.v[name].astype(mx.float32)
        m = m + (grad - m) * (1 - b1)  # torch's lerp_ for weight < 0.5
        v = v * b2 + (1 - b2) * grad * grad  # addcmul_: (value * g) * g
        self.m[name], self.v[name] = m.astype(self.state_dtype), v.astype(self.state_dtype)
        return param - step_size * (m / (mx.sqrt(v) / bias2_sqrt + self.eps))

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
