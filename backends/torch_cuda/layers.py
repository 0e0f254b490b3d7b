"""Selective activation checkpointing (per decoder layer, decided per micro-batch) and torch.compile.

Each decoder layer's ``forward`` is wrapped on the instance (so FSDP2's module hooks stay outside the
checkpoint and do not re-run on recompute). A flag on the layer says whether this micro-batch checkpoints
it: a checkpointed layer keeps only its fp32 input (4 * hidden bytes per token) and recomputes the rest in
the backward pass; the others keep every activation and are not recomputed. ``plan`` picks the fewest
checkpointed layers whose estimated activation memory fits the budget, so short micro-batches run without
recomputation and long ones fall back to full checkpointing.

Modes (config ``activation_checkpointing``): ``none``, ``full``, an integer (that many layers),
``auto`` (budget: the device's memory) or ``auto:GB`` (budget: GB GiB, e.g. to hold a memory target).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from redi.config import checkpointing_mode, fixed_checkpoint_layers

GIB = 1 << 30


def install(layers: list[torch.nn.Module], compile_layers: bool) -> None:
    if compile_layers:
        from torch._dynamo import config as dynamo_config

        # All layers share one graph (inline_inbuilt_nn_modules); row lengths vary, so allow recompiles.
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    for layer in layers:
        if getattr(layer, "_redi_wrapped", False):
            continue
        eager = layer.forward
        inner = torch.compile(eager, dynamic=True) if compile_layers else eager

        def forward(*args, _inner=inner, _eager=eager, _layer=layer, **kwargs):
            if not torch.is_grad_enabled():
                # Reference log-probs and generation (KV cache) run eagerly; the compiled graph is for training.
                return _eager(*args, **kwargs)
            if _layer._redi_checkpoint:
                return checkpoint(_inner, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = forward
        layer._redi_checkpoint = False
        layer._redi_wrapped = True


def set_checkpointed(layers: list[torch.nn.Module], count: int) -> None:
    """Checkpoint ``count`` layers, spread evenly over the depth."""
    n = len(layers)
    chosen = {min(n - 1, int(i * n / count)) for i in range(count)} if count > 0 else set()
    for i, layer in enumerate(layers):
        layer._redi_checkpoint = i in chosen


@dataclass
class MemoryModel:
    """Bytes per token that a decoder layer keeps for its backward pass (bf16 autocast, fp32 residual).

    Counted from Qwen2's forward: fp32 residual and RMSNorm saves, bf16 casts feeding the projections,
    q/k/v (and RoPE's fp32 outputs), attention output, o_proj, gate/up/act/product of the MLP. An estimate:
    calibrate ``scale`` on the GPU with ``scripts/bench.py`` if plans come out too tight.
    """

    hidden: int
    kv: int
    intermediate: int
    layers: int
    scale: float = 1.15

    @property
    def kept_per_token(self) -> float:
        return self.scale * (46 * self.hidden + 12 * self.kv + 8 * self.intermediate)

    @property
    def checkpointed_per_token(self) -> float:
        return 4 * self.hidden

    def activation_bytes(self, tokens: int, checkpointed: int) -> float:
        kept = (self.layers - checkpointed) * self.kept_per_token + checkpointed * self.checkpointed_per_token
        recompute = self.kept_per_token if checkpointed else 0.0
        return tokens * (kept + recompute)

    @classmethod
    def of(cls, config) -> "MemoryModel":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.num_key_value_heads * head_dim, config.intermediate_size,
                   config.num_hidden_layers)


def plan(mode: str | int, model_memory: MemoryModel, tokens: int, *, device: torch.device,
         static_bytes: float, workspace_bytes: float) -> int:
    """How many layers to checkpoint for a micro-batch of ``tokens`` tokens."""
    n = model_memory.layers
    fixed = fixed_checkpoint_layers(mode, n)
    if fixed is not None:
        return fixed
    value = checkpointing_mode(mode)[1]
    if device.type != "cuda":
        return 0  # the CPU path: host memory, no planning
    total = torch.cuda.get_device_properties(device).total_memory
    budget = min(total * 0.94, value * GIB) if value else total * 0.94
    free = budget - static_bytes - workspace_bytes - 1.0 * GIB  # allocator fragmentation, NCCL, cuBLAS
    for k in range(n + 1):
        if model_memory.activation_bytes(tokens, k) <= free:
            return k
    return n


def static_bytes_estimate(numel: int, world_size: int, state_bytes_per_param: int, *, grads_present: bool,
                          states_present: bool, layers: int) -> float:
    """What training holds besides activations: fp32 weights and grads and AdamW's moments (per rank under
    FSDP), the ones not allocated yet included, plus the bf16 copies autocast keeps of the weights in use
    (all of them, an upper bound) and, under FSDP, two unsharded fp32 layers (current and prefetched)."""
    per_rank = numel / world_size
    allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0.0
    missing = (0.0 if grads_present else 4 * per_rank) + (0.0 if states_present else 2 * state_bytes_per_param * per_rank)
    unsharded = 2 * 4 * numel / layers if world_size > 1 else 0.0
    return allocated + missing + 2 * numel + unsharded


def lm_head_workspace(chunk: int, vocab: int, hidden: int) -> float:
    # backward: fp32 logits/probs buffer, its bf16 copy, a bf16 [vocab x hidden] weight copy and its grad.
    return chunk * vocab * (4 + 2) + vocab * hidden * (2 + 2 + 4) + math.ceil(chunk * vocab * 4 * 0.5)
