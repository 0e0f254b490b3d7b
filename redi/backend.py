"""What the core asks of a backend, and how a backend name is resolved.

A backend is a narrow adapter: it loads an HF-format model directory, computes per-sequence completion
log-prob sums S and token counts L, accumulates gradients of a loss the core hands it, takes an optimizer
step, saves, and generates. Everything else (data, order, schedule, objectives, metrics) lives in the core.
"""
from __future__ import annotations

import importlib.util
import math
import platform
import sys
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from redi.data import TokenizedSeq
from redi.errors import UserError
from redi.lora import LoraSpec

@dataclass
class MicroBatch:
    """Sequences of one forward/backward. For pairs: the n chosen sequences, then the n rejected ones."""

    seqs: list[TokenizedSeq]
    n_pairs: int  # 0 for SFT
    weight: float  # this micro-batch's share of the step's loss denominator (pairs or tokens)
    indices: np.ndarray  # example indices, to look up cached reference log-probs
    ref_logps: np.ndarray | None = None  # [2 * n_pairs] reference S, chosen then rejected (DPO)

    @property
    def tokens(self) -> int:
        return sum(s.length for s in self.seqs)

    def padded(self, pad_id: int, multiple: int = 8) -> dict[str, np.ndarray]:
        """Right-padded arrays. ``label_mask[b, t]`` is 1 where token t is a scored completion token."""
        longest = max(s.length for s in self.seqs)
        width = int(math.ceil(longest / multiple) * multiple)
        b = len(self.seqs)
        input_ids = np.full((b, width), pad_id, dtype=np.int64)
        attention = np.zeros((b, width), dtype=np.int64)
        labels = np.zeros((b, width), dtype=np.int64)
        for i, s in enumerate(self.seqs):
            p, c = len(s.prompt), len(s.completion)
            input_ids[i, :p] = s.prompt
            input_ids[i, p:p + c] = s.completion
            attention[i, :p + c] = 1
            labels[i, p:p + c] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "label_mask": labels}


# loss_fn(ops, S, L) -> scalar loss of this micro-batch, already weighted by its share of the step.
LossFn = Callable[[Any, Any, Any], Any]


class Backend(Protocol):
    name: str
    ops: Any

    # model_config: edits to the model's config.json (``edit_model_config``), applied before the weights load
    # and kept in every checkpoint the backend saves. Passed only when the run sets some (``model_edits``).
    def load(self, model_path: str, *, precision: str, lm_head_chunk: int, model_config: dict | None = None) -> None: ...
    def start_stage(self, *, weight_decay: float) -> None: ...
    def forward_backward(self, batch: MicroBatch, loss_fn: LossFn) -> tuple[np.ndarray, np.ndarray]: ...
    def sequence_logps(self, batch: MicroBatch) -> tuple[np.ndarray, np.ndarray]: ...
    def optimizer_step(self, lr: float, max_grad_norm: float) -> dict[str, float]: ...
    def save_model(self, path: str) -> None: ...
    def save_state(self, path: str) -> None: ...
    def load_state(self, path: str) -> None: ...
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, eos_id: int, batch_size: int = 64, stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """Sample one completion per prompt, continuously batched over ``batch_size`` rows (a finished row
        takes the next prompt); a row ends at ``eos_id``, any of ``stop_ids`` (included in its output) or
        ``max_new_tokens``."""
        ...
    def num_parameters(self) -> int: ...


def model_edits(cfg: Any) -> dict:
    """``load``'s model_config keyword for a run config: present only when the run edits the model."""
    return {"model_config": dict(cfg.model_config)} if cfg.model_config else {}


def edit_model_config(config: dict, edits: dict | None, where: str) -> dict:
    """A model's config.json with the run's ``model_config`` edits (any key the file has).

    transformers 5 keeps ``rope_theta`` inside ``rope_parameters`` and mlx-lm reads the top-level key, so an
    edit of a key found in either place is written to both places it exists (rope_theta to both always)."""
    out = dict(config)
    rope = dict(out["rope_parameters"]) if isinstance(out.get("rope_parameters"), dict) else None
    for key, value in (edits or {}).items():
        if key not in out and (rope is None or key not in rope):
            raise UserError(f"model_config key '{key}' is not a key of {where}/config.json")
        if key in out or key == "rope_theta":
            out[key] = value
        if rope is not None and (key in rope or key == "rope_theta"):
            rope[key] = value
    if rope is not None:
        out["rope_parameters"] = rope
    return out


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


def make_backend(name: str, seed: int = 0, lora: LoraSpec | None = None) -> Backend:
    """``lora``: train LoRA/DoRA adapters over a frozen base (PEFT on torch, mlx-lm's tuner on MLX)."""
    name = name or default_backend()
    if name in ("cpu", "cuda"):
        if lora is not None and importlib.util.find_spec("peft") is None:
            raise UserError(f"lora_rank on --backend {name} needs PEFT: pip install 'redi[lora]'")
        if importlib.util.find_spec("torch") is None:
            raise UserError(f"--backend {name} needs PyTorch: pip install 'redi[torch]' (or torch==2.13.0 for CPU)")
        if name == "cuda" and not _cuda_available():
            alternatives = "cpu or mlx" if _is_apple_silicon() else "cpu (or mlx on Apple silicon)"
            raise UserError(f"--backend cuda: no usable CUDA GPU (torch.cuda.is_available() is False); use {alternatives}")
        from redi.backends.torch_cuda.backend import TorchBackend

        return TorchBackend(device=name, seed=seed, lora=lora)
    if name == "mlx":
        if importlib.util.find_spec("mlx") is None:
            raise UserError("--backend mlx needs MLX: pip install 'redi[mlx]'")
        try:
            from redi.backends.mlx.backend import MLXBackend
        except ModuleNotFoundError as err:
            raise UserError(f"--backend mlx is not available in this build ({err})") from None
        return MLXBackend(seed=seed, lora=lora)
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
