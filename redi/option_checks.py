"""Checks of the option keys that the config and each backend's constructor or ``load`` both apply (a backend
may be built directly, without a Config)."""
from __future__ import annotations

from redi.errors import UserError
from redi.layer_checkpointing import checkpointing_mode


def check_precision(precision: str, backend: str) -> None:
    """``precision`` checked for the config and again by each backend's ``load`` (which may be called directly)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"config key 'precision' must be auto, fp32 or bf16, got '{precision}'")
    if precision == "bf16" and backend == "cpu":
        raise UserError("config key 'precision' is bf16 but the cpu backend computes in fp32; use --backend cuda or mlx")


def check_memory_options(activation_checkpointing: str, optim_state_dtype: str) -> None:
    """The memory keys both backends read, checked for the config and by each backend's constructor."""
    checkpointing_mode(activation_checkpointing)
    if optim_state_dtype not in ("fp32", "bf16"):
        raise UserError(f"config key 'optim_state_dtype' must be fp32 or bf16, got '{optim_state_dtype}'")


def packing_mode(value: str | bool) -> str:
    """``packing`` parsed once for every backend: "true", "false" or "auto" (the torch backend packs on CUDA
    and under torchrun, and pads on a CPU, where its per-document attention measured slower; MLX always pads)."""
    text = str(value).strip().lower()
    if text in ("false", "true", "auto"):
        return text
    raise UserError(f"config key 'packing' must be true, false or auto, got '{value}'")


def compile_mode(value: str | bool) -> str:
    """``compile`` parsed once for every backend: "false", "true" (every device) or "auto" (each backend
    compiles where it measured a gain: the torch backend on CUDA, the MLX backend nowhere yet)."""
    text = str(value).strip().lower()
    if text in ("false", "true", "auto"):
        return text
    raise UserError(f"config key 'compile' must be false, true or auto, got '{value}'")
