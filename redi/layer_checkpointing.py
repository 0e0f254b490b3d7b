"""Activation checkpointing per decoder layer, the rules every backend shares: the config key's modes
(``none``, ``full``, ``N`` layers, ``auto``, ``auto:GB``) and how many layers a micro-batch recomputes.
Each backend supplies its own memory model and budget (backends/torch_cuda/layers.py, backends/mlx/checkpointing.py)."""
from __future__ import annotations

import re
from typing import Callable

from redi.errors import UserError


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
