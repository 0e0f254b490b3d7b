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
import os
import sys
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from redi.layer_checkpointing import planned_checkpoint_layers

GIB = 1 << 30


def install(layers: list[torch.nn.Module], compile_layers: bool) -> None:
    """Wrap each layer's ``forward``: the per-micro-batch checkpoint flag and, with ``compile_layers``, one
    torch.compile'd graph for all layers that falls back to eager for good (one warning line) if compiling
    fails."""
    state = _CompileState(enabled=compile_layers)
    if compile_layers:
        from torch._dynamo import config as dynamo_config

        # All layers share one graph (inline_inbuilt_nn_modules); row lengths vary, so allow recompiles.
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    for layer in layers:
        if getattr(layer, "_redi_wrapped", False):
            continue
        eager = inner = layer.forward
        if state.enabled:
            try:  # an unknown backend fails here, a failing compiler at the first call
                inner = torch.compile(eager, dynamic=True, backend=compile_backend())
            except COMPILE_ERRORS as err:
                state.fall_back(err)

        def forward(*args, _inner=inner, _eager=eager, _layer=layer, **kwargs):
            if not torch.is_grad_enabled():
                # Reference log-probs and generation (KV cache) run eagerly; the compiled graph is for training.
                return _eager(*args, **kwargs)
            if state.enabled:
                try:
                    with _backward_compiled_in_forward():
                        return _run(_layer, _inner, args, kwargs)
                except COMPILE_ERRORS as err:
                    state.fall_back(err)
            return _run(_layer, _eager, args, kwargs)

        layer.forward = forward
        layer._redi_checkpoint = False
        layer._redi_wrapped = True
        layer._redi_compile = state


def compile_backend() -> str:
    """torch.compile's backend: inductor; ``REDI_COMPILE_BACKEND`` overrides it (the CPU tests use aot_eager,
    which traces the same graph without generating C++)."""
    return os.environ.get("REDI_COMPILE_BACKEND", "inductor")


def _run(layer: torch.nn.Module, fn, args, kwargs):
    if layer._redi_checkpoint:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    return fn(*args, **kwargs)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failing compiler raises: dynamo's and inductor's exceptions (never an out-of-memory error, which
    eager would hit too)."""
    from torch._dynamo.exc import TorchDynamoException

    errors: list[type[BaseException]] = [TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError, InvalidCxxCompiler

        errors += [InductorError, InvalidCxxCompiler]
    except ImportError:
        pass
    return tuple(errors)


COMPILE_ERRORS = _compile_errors()


def _backward_compiled_in_forward():
    """AOTAutograd compiles the backward lazily, at the first ``backward()``, where a failure could not be
    undone (part of the gradient is accumulated by then). Compiling it with the forward makes every compiler
    failure surface in the layer's forward, before anything ran."""
    from torch._functorch import config as functorch_config

    return functorch_config.patch(force_non_lazy_backward_lowering=True)


@dataclass
class _CompileState:
    """Shared by all layers of one model: one failure turns every layer eager (they share one graph)."""

    enabled: bool
    failure: str = ""

    def fall_back(self, err: BaseException) -> None:
        self.enabled = False
        self.failure = warn_compile_failed("the decoder layers", err)


def warn_compile_failed(what: str, err: BaseException) -> str:
    """The one warning line of a compile fall-back (no traceback); returns the failure's short form."""
    first = (str(err).strip().splitlines() or [""])[0][:200]
    failure = f"{type(err).__name__}: {first}"
    print(f"warning: torch.compile of {what} failed ({failure}); training continues eagerly", file=sys.stderr, flush=True)
    return failure


def compiled(layers: list[torch.nn.Module]) -> bool:
    """Whether the layers run compiled now (false when off, or after a fall-back to eager)."""
    state = getattr(layers[0], "_redi_compile", None) if layers else None
    return bool(state and state.enabled)


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
    def free(cap_gb: float | None) -> float | None:
        if device.type != "cuda":
            return None  # the CPU path: host memory, no planning
        return cuda_free_bytes(device, cap_gb, static_bytes, workspace_bytes)

    return planned_checkpoint_layers(mode, model_memory.layers, free, lambda k: model_memory.activation_bytes(tokens, k))


def cuda_free_bytes(device: torch.device, cap_gb: float | None, static_bytes: float, workspace_bytes: float) -> float:
    """The GPU memory left for one micro-batch's activations (under an ``auto:GB`` cap when given)."""
    total = torch.cuda.get_device_properties(device).total_memory
    budget = min(total * 0.94, cap_gb * GIB) if cap_gb else total * 0.94
    return budget - static_bytes - workspace_bytes - 1.0 * GIB  # allocator fragmentation, NCCL, cuBLAS


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
