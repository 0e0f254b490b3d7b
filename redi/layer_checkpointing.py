"""Memory planning, the rules every backend shares: activation checkpointing per decoder layer (the config key's
modes ``none``, ``full``, ``N`` layers, ``auto``, ``auto:GB``, and how many layers a micro-batch recomputes) and
the token budget of a micro-batch (``micro_batch_tokens``: ``auto`` or a number). Each backend supplies its own
memory model and free memory (backends/torch_cuda/layers.py, backends/mlx/checkpointing.py)."""
from __future__ import annotations

import os
import re
from typing import Callable

from redi.errors import UserError
from redi.procfs import proc_kib_bytes


def checkpointing_mode(mode: str | int) -> tuple[str, float | None]:
    """``activation_checkpointing`` parsed once for every backend: ("none"|"full"|"auto"|"count", value)."""
    text = str(mode).strip().lower()
    if text in ("none", "full", "auto"):
        return text, None
    if re.fullmatch(r"auto:\d+(\.\d+)?", text):
        return "auto", float(text.split(":", 1)[1])
    if text.isdigit():
        return "count", float(text)
    raise UserError(f"config key 'activation_checkpointing' must be none, full, auto, auto:GB or a number of "
                    f"layers, got '{mode}'")


def fixed_checkpoint_layers(mode: str | int, n_layers: int) -> int | None:
    """Layers to recompute when the mode alone decides it; None for auto, where the backend plans."""
    kind, value = checkpointing_mode(mode)
    if kind == "auto":
        return None
    return {"none": 0, "full": n_layers}.get(kind, max(0, min(n_layers, int(value or 0))))


def planned_checkpoint_layers(mode: str | int, n_layers: int, free_bytes: Callable[[float | None], float | None],
                              activation_bytes: Callable[[int], float]) -> int:
    """Layers to recompute for one micro-batch, on every backend: fixed by the mode, or (auto) the fewest whose
    activations fit. ``free_bytes(cap)`` is the memory left for activations under an ``auto:GB`` cap (None: no
    cap), or None where the backend does not plan (host memory); ``activation_bytes(k)``, with k recomputed."""
    fixed = fixed_checkpoint_layers(mode, n_layers)
    if fixed is not None:
        return fixed
    free = free_bytes(checkpointing_mode(mode)[1])
    if free is None:
        return 0
    return next((k for k in range(n_layers + 1) if activation_bytes(k) <= free), n_layers)


def micro_batch_tokens_value(value: str | int, key: str = "micro_batch_tokens") -> int | None:
    """``micro_batch_tokens`` parsed once for every backend: None for ``auto``, else a token count (0: no budget)."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text.isdigit():
        return int(text)
    raise UserError(f"config key '{key}' must be auto or a number of tokens (0: no budget), got '{value}'")


def token_budget(free: float | None, activation_bytes: Callable[[int], float], ceiling: int = 1 << 24) -> int:
    """``micro_batch_tokens: auto``: the most tokens of one micro-batch whose activations (``activation_bytes(t)``,
    growing with t) fit the ``free`` bytes the backend leaves for them; at least 1. ``free`` None: no limit."""
    if free is None:
        return ceiling
    low, high = 1, ceiling
    if activation_bytes(high) <= free:
        return high
    while low < high:  # the largest t with activation_bytes(t) <= free (1 when even one token does not fit)
        mid = (low + high + 1) // 2
        if activation_bytes(mid) <= free:
            low = mid
        else:
            high = mid - 1
    return low


# Host memory (a CPU, or MLX's CPU build) is shared with everything else on the machine: plan with half of it.
HOST_SHARE = 0.5


def host_free_bytes(static_bytes: float) -> float:
    """Host memory a micro-batch's activations may use: a share of what is available, less ``static_bytes``
    (what training will still allocate besides activations)."""
    return HOST_SHARE * host_available_bytes() - static_bytes


def host_available_bytes() -> float:
    """Memory the OS could give this process now: MemAvailable on Linux, psutil where installed, else half the RAM."""
    available = proc_kib_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return float(available)
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        return 0.5 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
