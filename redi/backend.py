"""What the core asks of a backend, and how a backend name is resolved.

A backend is a narrow adapter: it loads an HF-format model directory, computes per-sequence completion
log-prob sums S and token counts L, accumulates gradients of a loss the core hands it, takes an optimizer
step, saves, and generates. Everything else (data, order, schedule, objectives, metrics) lives in the core.
"""
from __future__ import annotations

import importlib.util
import platform
import sys
from typing import Any, Callable, Protocol

import numpy as np

from redi.batching import MicroBatch
from redi.errors import UserError

# loss_fn(ops, S, L) -> scalar loss of this micro-batch, already weighted by its share of the step.
LossFn = Callable[[Any, Any, Any], Any]


class Backend(Protocol):
    name: str
    ops: Any

    def load(self, model_path: str, *, precision: str, lm_head_chunk: int) -> None: ...
    def start_stage(self, *, weight_decay: float) -> None: ...
    def forward_backward(self, batch: MicroBatch, loss_fn: LossFn) -> tuple[np.ndarray, np.ndarray]: ...
    def sequence_logps(self, batch: MicroBatch) -> tuple[np.ndarray, np.ndarray]: ...
    def optimizer_step(self, lr: float, max_grad_norm: float) -> dict[str, float]: ...
    def save_model(self, path: str) -> None: ...
    def save_state(self, path: str) -> None: ...
    def load_state(self, path: str) -> None: ...
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, eos_id: int) -> list[list[int]]: ...
    def num_parameters(self) -> int: ...


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    from redi.backends.torch_cuda import cuda_available  # the probe lives with the backend that needs torch

    return cuda_available()


def _is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def default_backend() -> str:
    if _cuda_available():
        return "cuda"
    if _is_apple_silicon() and importlib.util.find_spec("mlx") is not None:
        return "mlx"
    return "cpu"


def make_backend(name: str, seed: int = 0, **mlx_options) -> Backend:
    """``mlx_options`` (lora_rank, lora_scale, lora_dora) go to the MLX backend only."""
    name = name or default_backend()
    if name in ("cpu", "cuda"):
        if mlx_options.get("lora_rank") or mlx_options.get("lora_dora"):
            raise UserError(f"lora_rank and lora_dora need --backend mlx; --backend {name} trains all weights")
        if importlib.util.find_spec("torch") is None:
            raise UserError(f"--backend {name} needs PyTorch: pip install 'redi[torch]' (or torch==2.13.0 for CPU)")
        if name == "cuda" and not _cuda_available():
            alternatives = "cpu or mlx" if _is_apple_silicon() else "cpu (or mlx on Apple silicon)"
            raise UserError(f"--backend cuda: no usable CUDA GPU (torch.cuda.is_available() is False); use {alternatives}")
        from redi.backends.torch_cuda.backend import TorchBackend

        return TorchBackend(device=name, seed=seed)
    if name == "mlx":
        if importlib.util.find_spec("mlx") is None:
            raise UserError("--backend mlx needs MLX: pip install 'redi[mlx]'")
        try:
            from redi.backends.mlx.backend import MLXBackend
        except ModuleNotFoundError as err:
            raise UserError(f"--backend mlx is not available in this build ({err})") from None
        return MLXBackend(seed=seed, **mlx_options)
    raise UserError(f"unknown backend '{name}'; valid backends: cpu, cuda, mlx")


class NumpyOps:
    """The objectives' array ops in numpy (float64), for metrics and reference computations."""

    @staticmethod
    def log_sigmoid(x: Any) -> Any:
        return -np.logaddexp(0.0, -x)

    @staticmethod
    def mean(x: Any) -> Any:
        return np.mean(x)

    @staticmethod
    def sum(x: Any) -> Any:
        return np.sum(x)

    @staticmethod
    def asarray(x: Any) -> Any:
        return np.asarray(x, dtype=np.float64)
