"""Optimizer pieces: AdamW with bf16 moments over fp32 weights, and the step with its norms.

fp32 master weights are not negotiable (stage 2's lr of 1e-6 is below half a bf16 ulp of the weights), but
AdamW's two moments tolerate bf16 storage: they only scale the update, and 8 bits of mantissa move it by
< 0.4%. That saves 4 of the 16 bytes per parameter that fp32 weights + grads + moments cost (1.5B
parameters: 24.7 GB -> 18.5 GB). The default stays torch's (fused on CUDA) AdamW with fp32 moments.

``step_with_norms`` measures the update norm (the paper's collapse signal) exactly, as the norm of
(weights after - weights before), without a full copy of the weights: the step runs bucket by bucket, each
bucket's weights copied just before (``bucket_numel`` elements of extra memory).
"""
from __future__ import annotations

import math

import torch

from redi.backends.torch_cuda.distributed import Dist, local
from redi.training.batching import token_groups


class AdamWLowPrecisionState(torch.optim.Optimizer):
    """torch.optim.AdamW's arithmetic (decoupled decay, bias correction) with moments stored in ``state_dtype``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 state_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                t = float(state["step"])
                w, g = local(p), local(p.grad).float()
                m_store, v_store = local(state["exp_avg"]), local(state["exp_avg_sq"])
                m, v = m_store.float(), v_store.float()
                w.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
                m_store.copy_(m)
                v_store.copy_(v)
        return None


def make_adamw(groups: list[dict], device: torch.device, state_dtype: str) -> torch.optim.Optimizer:
    if state_dtype == "bf16":
        return AdamWLowPrecisionState(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8, state_dtype=torch.bfloat16)
    # Fused on the CPU too: one pass over each tensor instead of eight, and the step is memory-bound there
    # (a third of a short-row step on SmolLM2-135M, profiled). Within 1 fp32 ulp of the for-each arithmetic.
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8, fused=device.type in ("cuda", "cpu"))


# Row length of the CPU norms below: rows this short sum accurately in fp32, and their squares add in fp64.
NORM_ROW = 1024


def tensor_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor 2-norms. On the CPU ``torch._foreach_norm`` comes out 1.7e-3 low on a 28M-entry (tied
    embedding) gradient (docs/real-model.md); the norms of ``NORM_ROW``-long rows, combined in float64, are
    right to 1e-9 and 8x faster than a sum of squares (which writes the squares out first). CUDA's tree
    reductions are fine."""
    if tensors[0].device.type == "cpu":
        return [_cpu_norm(t) for t in tensors]
    return list(torch._foreach_norm(tensors))


def _cpu_norm(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1).float()
    whole = flat.numel() - flat.numel() % NORM_ROW
    parts = [torch.linalg.vector_norm(flat[:whole].view(-1, NORM_ROW), dim=1)] if whole else []
    if whole < flat.numel():
        parts.append(torch.linalg.vector_norm(flat[whole:]).reshape(1))
    return torch.cat(parts).double().pow(2).sum().sqrt().float()


def grad_norm_and_clip(params: list[torch.Tensor], max_grad_norm: float, dist: Dist) -> torch.Tensor:
    """Global L2 norm of the gradients (over every rank's shard) and, if above the cap, the clip in place:
    torch's clip_grad_norm_ rule, coefficient max_norm / (norm + 1e-6) clamped to 1."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = tensor_norms(grads)
    sq = torch.stack([n.float() for n in norms]).pow(2).sum()
    total = dist.all_reduce_sum(sq).sqrt()
    if max_grad_norm > 0 and torch.isfinite(total):
        coef = torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)
        if coef < 1.0:  # a coefficient of 1 changes nothing: skip the pass over every gradient
            torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total


def step_with_norms(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], dist: Dist,
                    bucket_numel: int | None) -> float:
    """Run ``optimizer.step()`` and return the global norm of the change it made to ``params``."""
    live = [p for p in params if p.grad is not None]
    if bucket_numel is None:
        return _step_with_norm_in_buffer(optimizer, live, dist, params)
    buckets = [[live[k] for k in g] for g in token_groups([local(p).numel() for p in live], bucket_numel)]
    sq = torch.zeros((), dtype=torch.float64)
    for bucket in buckets:
        held = {}
        if len(buckets) > 1:
            members = {id(p) for p in bucket}
            held = {p: p.grad for p in live if id(p) not in members}
            for p in held:
                p.grad = None  # AdamW skips parameters without a gradient: only this bucket moves
        before = [local(p).detach().clone() for p in bucket]
        optimizer.step()
        for p, g in held.items():
            p.grad = g
        deltas = torch._foreach_sub([local(p).detach() for p in bucket], before)
        del before
        if deltas:
            sq += torch.stack([n.float() for n in tensor_norms(deltas)]).pow(2).sum().double().cpu()
        del deltas
    return float(dist.all_reduce_sum(sq.to(dtype=torch.float32, device=_comm_device(params, dist))).sqrt())


def _step_with_norm_in_buffer(optimizer: torch.optim.Optimizer, live: list[torch.Tensor], dist: Dist,
                              params: list[torch.Tensor]) -> float:
    """``step_with_norms`` in one piece (the CPU): the weights before the step go into a buffer kept on the
    optimizer between steps, and the change is taken in place there. Fresh weight-sized allocations every step
    (a clone, then a difference) cost more in page faults than the arithmetic on a CPU (profiled)."""
    weights = [local(p).detach() for p in live]
    held = getattr(optimizer, "_redi_before", None)
    if held is None or [b.shape for b in held] != [w.shape for w in weights]:
        held = optimizer._redi_before = [torch.empty_like(w) for w in weights]
    torch._foreach_copy_(held, weights)
    optimizer.step()
    torch._foreach_sub_(held, weights)  # before - after: the change's norm, sign aside
    sq = torch.stack([n.float() for n in tensor_norms(held)]).pow(2).sum().double().cpu() if held else \
        torch.zeros((), dtype=torch.float64)
    return float(dist.all_reduce_sum(sq.to(dtype=torch.float32, device=_comm_device(params, dist))).sqrt())


def _comm_device(params: list[torch.Tensor], dist: Dist) -> torch.device:
    return local(params[0]).device if params else torch.device("cpu")
