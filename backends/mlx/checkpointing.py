"""Activation checkpointing per decoder layer, decided per micro-batch (the config's ``activation_checkpointing``).

Modes as in the torch backend: ``none``, ``full``, ``N`` (the first N layers), ``auto`` and ``auto:GB``.
``auto`` plans only on an Apple GPU, against Metal's recommended working set (or the GB cap); on a CPU it
checkpoints nothing, as the torch backend does. The byte counts are ``memory.py``'s (``layer_internals`` per
token; four attention matrices and three fp32 LM-head chunks in flight), applied to the actual micro-batch.

The layers' class is swapped per instance (``layer.__class__``), never patched: mlx-lm's ``grad_checkpoint``
rewrites ``__call__`` on the class itself, which changes every model of that class in the process.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from redi.backends.mlx.memory import layer_internals
from redi.layer_checkpointing import HOST_SHARE, host_available_bytes, host_free_bytes, planned_checkpoint_layers

GB = 1e9
_SUBCLASSES: dict[type, type] = {}


def _checkpointed_class(base: type) -> type:
    if base not in _SUBCLASSES:
        def __call__(self, x, mask=None, cache=None, **kwargs):
            # Generation (a KV cache) and unplanned layers take the plain path.
            if cache is not None or kwargs or not getattr(self, "redi_checkpoint", False):
                return base.__call__(self, x, mask, cache, **kwargs)
            return nn.utils.checkpoint(self, lambda h, m: base.__call__(self, h, m))(x, mask)

        _SUBCLASSES[base] = type(f"Checkpointed{base.__name__}", (base,), {"__call__": __call__})
    return _SUBCLASSES[base]


def install(layers: list[nn.Module]) -> None:
    for layer in layers:
        layer.__class__ = _checkpointed_class(type(layer))
        layer.redi_checkpoint = False


def apply(layers: list[nn.Module], count: int) -> None:
    """Checkpoint the first ``count`` layers (their saved inputs live longest) and run the rest plainly."""
    for i, layer in enumerate(layers):
        layer.redi_checkpoint = i < count


def activation_bytes(config: dict, tokens: int, width: int, seqs: int, checkpointed: int, compute_bytes: int,
                     lm_head_chunk: int) -> float:
    """Peak activation bytes of one micro-batch with the first ``checkpointed`` layers recomputed."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads) * (h // heads)
    internals = layer_internals(h, inter, kv) * compute_bytes  # per token, one layer's forward tensors
    attention = heads * width * width * seqs * compute_bytes  # one [heads, T, T] matrix per sequence
    kept = (layers - checkpointed) * (tokens * internals + attention) + checkpointed * tokens * h * compute_bytes
    # One layer recomputed with its gradients, its unfused attention backward, one LM-head chunk.
    transient = 2 * tokens * internals + 4 * attention + 12 * lm_head_chunk * config["vocab_size"]
    return kept + transient


def plan(mode: str, config: dict, *, tokens: int, width: int, seqs: int, static_bytes: float,
         compute_bytes: int, lm_head_chunk: int, budget_bytes: float | None = None) -> int:
    """How many layers to checkpoint for this micro-batch."""
    def free(cap_gb: float | None) -> float | None:
        if budget_bytes is not None:
            return budget_bytes - static_bytes
        if not mx.metal.is_available():
            return None  # a CPU: host memory, no planning (as the torch backend)
        return free_bytes(static_bytes, cap_gb)

    return planned_checkpoint_layers(
        mode, config["num_hidden_layers"], free,
        lambda k: activation_bytes(config, tokens, width, seqs, k, compute_bytes, lm_head_chunk))


def free_bytes(static_bytes: float, cap_gb: float | None) -> float:
    """Memory left for activations: 90% of Metal's recommended working set (or the ``auto:GB`` cap) on an Apple
    GPU; on a CPU (mlx[cpu]) a share of the host's available memory."""
    if not mx.metal.is_available():
        # Freed buffers MLX keeps for reuse (see keep_freed_buffers) are memory it can hand out again.
        return host_free_bytes(static_bytes) + HOST_SHARE * mx.get_cache_memory()
    budget = 0.9 * mx.device_info().get("max_recommended_working_set_size", 0)
    return (min(budget, cap_gb * GB) if cap_gb else budget) - static_bytes


def keep_freed_buffers(step_bytes: float) -> None:
    """On a CPU, let MLX keep up to two training steps' turnover of freed buffers for reuse. Its CPU default is
    32 MB (on Metal it is the whole memory limit), so every weight, moment and gradient a step replaces went
    back to the OS and the next step's came back as fresh, zero-filled pages: 1.30 s against 1.09 s for a
    short-row SmolLM2-135M optimizer step on mlx[cpu]. Two steps' worth, so a second model in the process (a DPO reference, a
    benchmark's baseline) does not evict the trained one's; held to a share of what the host has available."""
    if mx.metal.is_available():
        return
    limit = int(min(2 * step_bytes, HOST_SHARE * host_available_bytes()))
    previous = mx.set_cache_limit(limit)
    if previous > limit:
        mx.set_cache_limit(previous)  # never lower a limit the user (or an earlier run) raised
