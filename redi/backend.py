"""What the core asks of a backend, and how a backend name is resolved.

A backend is a narrow adapter: it loads an HF-format model directory, computes per-sequence completion
log-prob sums S and token counts L, accumulates gradients of a loss the core hands it, takes an optimizer
step, saves, and generates. Everything else (data, order, schedule, objectives, metrics) lives in the core.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import platform
import sys
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from redi.option_checks import check_memory_options, compile_mode, packing_mode
from redi.data import TokenizedSeq
from redi.errors import UserError
from redi.lora import spec_from_config
from redi.objectives import ArrayOps

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
    """Everything the core calls on a backend; a new backend implements exactly this (tests/test_backend_contract.py
    checks the torch and MLX backends against it). Options (the keys in ``OPTION_KEYS``) reach a backend once, as
    keyword arguments of its constructor, through ``make_backend``."""

    name: str  # "cpu", "cuda", "mlx"
    ops: ArrayOps  # the objectives' array functions on this backend's arrays
    rank: int  # this process's rank; 0 without multi-process training. Only rank 0 writes files.
    world_size: int  # number of training processes; 1 without multi-process training
    pads_micro_batches: bool  # micro-batches run right-padded (not packed): their token budget counts the padding

    def load(self, model_path: str, *, precision: str, lm_head_chunk: int, model_config: dict | None = None) -> None:
        """Load an HF model folder as fp32 master weights; drops any optimizer. ``model_config``: edits to the
        model's config.json (``edit_model_config``), applied before the weights load and kept in every
        checkpoint the backend saves; passed only when the run sets some (``model_edits``)."""

    def init_optimizer(self, *, weight_decay: float) -> None:
        """A fresh AdamW over the trainable weights (stage start), gradients zeroed."""

    def forward_backward(self, batch: MicroBatch, loss_fn: LossFn) -> tuple[np.ndarray, np.ndarray]:
        """Accumulate the gradient of ``loss_fn(ops, S, L)``; return S and L as numpy arrays."""

    def sequence_logps(self, batch: MicroBatch) -> tuple[np.ndarray, np.ndarray]:
        """S and L without gradients."""

    def optimizer_step(self, lr: float, max_grad_norm: float) -> dict[str, float]:
        """Clip, step, zero the gradients: ``grad_norm``, ``update_norm`` and ``skipped`` (non-finite gradient)."""

    def save_model(self, path: str | None) -> None:
        """Write an HF model folder. Collective under multi-process: every rank calls it, ranks other than 0
        with ``path=None``, and only rank 0 writes."""

    def save_checkpoint(self, path: str | None) -> None:
        """``save_model`` plus the optimizer state (under LoRA the adapters instead of the model): everything
        ``load_checkpoint`` reads back.
        Collective like ``save_model``."""

    def load_checkpoint(self, path: str) -> None:
        """Weights and optimizer state from a ``save_checkpoint`` folder (after ``load`` and ``init_optimizer``)."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` in one process). Collective."""

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, eos_id: int, batch_size: int = 64, stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """Sample one completion per prompt, continuously batched over ``batch_size`` rows (a finished row
        takes the next prompt); a row ends at ``eos_id``, any of ``stop_ids`` (included in its output) or
        ``max_new_tokens``."""

    def micro_batch_token_budget(self, longest: int) -> int:
        """``micro_batch_tokens: auto`` (after ``load`` and ``init_optimizer``): the most tokens one micro-batch
        may hold, rows of up to ``longest`` tokens, so that its activations fit in the memory this backend has
        free, with the layers ``activation_checkpointing`` fixes (auto: none) recomputed."""

    def num_parameters(self) -> int:
        """Parameter count of the loaded model."""

    def num_trainable_parameters(self) -> int:
        """Parameters the optimizer updates: the adapters under LoRA, every weight otherwise."""


# The config keys each backend reads (config.py declares them; docs/cuda.md and docs/mlx.md explain them).
# Both backends read all of them: the speed and memory keys as they are, the lora_* keys as one LoraSpec.
SPEED_KEYS = ("packing", "activation_checkpointing", "compile", "optim_state_dtype")
LORA_KEYS = ("lora_rank", "lora_scale", "lora_dropout", "lora_dora", "lora_targets")
OPTION_KEYS = {"cpu": SPEED_KEYS + LORA_KEYS, "cuda": SPEED_KEYS + LORA_KEYS, "mlx": SPEED_KEYS + LORA_KEYS}


def backend_options(cfg: Any, name: str) -> dict[str, Any]:
    """The options of backend ``name`` taken from a ``Config``: the one route by which options reach a backend
    (``make_backend(name, seed, **backend_options(cfg, name))``)."""
    name = name or default_backend()
    if name not in OPTION_KEYS:
        raise UserError(f"unknown backend '{name}'; valid backends: {', '.join(OPTION_KEYS)}")
    options: dict[str, Any] = {key: getattr(cfg, key) for key in OPTION_KEYS[name] if key in SPEED_KEYS}
    options["lora"] = spec_from_config(cfg)
    return options


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


def apply_options(target: Any, options: dict[str, Any], backend: str) -> None:
    """Set the fields of a backend's options dataclass from its constructor's keyword arguments, refusing keys it
    does not have; the memory keys are checked and ``compile`` and ``packing`` parsed as the config does."""
    fields = {f.name for f in dataclasses.fields(target)}
    for key, value in options.items():
        if key not in fields:
            raise UserError(f"unknown {backend} backend option '{key}'")
        setattr(target, key, value)
    check_memory_options(target.activation_checkpointing, target.optim_state_dtype)
    target.compile = compile_mode(target.compile)
    target.packing = packing_mode(target.packing)


def record_drawn(drawn: Sequence[int], ids: list, tokens: list[list[int]], fresh: int, stops,
                 max_new_tokens: int, outputs: dict) -> list[int]:
    """One decode step of the continuous-batching generators (both backends): append each running row's drawn
    token and move finished rows (a stop token or max_new_tokens) to ``outputs[ids[r]]``. Rows below ``fresh``
    were admitted this step and already hold their pending token. Returns the rows to keep."""
    keep = []
    for r, token in enumerate(drawn):
        if r < fresh:
            keep.append(r)
            continue
        tokens[r].append(token)
        if token in stops or len(tokens[r]) >= max_new_tokens:
            outputs[ids[r]] = tokens[r]
        else:
            keep.append(r)
    return keep


def no_weight_decay(name: str, ndim: int) -> bool:
    """HF Trainer's rule, which the authors' runs used: no weight decay on biases and norm weights."""
    return ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def make_backend(name: str, seed: int = 0, **options: Any) -> Backend:
    """Backend ``name`` (empty: ``default_backend()``) built with ``options``: ``lora`` (a ``LoraSpec``: adapters
    over a frozen base, PEFT on torch, mlx-lm's tuner on MLX) and the ``SPEED_KEYS``."""
    name = name or default_backend()
    if name in ("cpu", "cuda"):
        if options.get("lora") is not None and importlib.util.find_spec("peft") is None:
            raise UserError(f"lora_rank on --backend {name} needs PEFT: pip install 'redi[lora]'")
        if importlib.util.find_spec("torch") is None:
            raise UserError(f"--backend {name} needs PyTorch: pip install 'redi[torch]' (or torch==2.13.0 for CPU)")
        if name == "cuda" and not _cuda_available():
            alternatives = "cpu or mlx" if _is_apple_silicon() else "cpu (or mlx on Apple silicon)"
            raise UserError(f"--backend cuda: no usable CUDA GPU (torch.cuda.is_available() is False); use {alternatives}")
        from redi.backends.torch_cuda.backend import TorchBackend

        return TorchBackend(device=name, seed=seed, **options)
    if name == "mlx":
        if importlib.util.find_spec("mlx") is None:
            raise UserError("--backend mlx needs MLX: pip install 'redi[mlx]'")
        try:
            from redi.backends.mlx.backend import MLXBackend
        except ModuleNotFoundError as err:
            raise UserError(f"--backend mlx is not available in this build ({err})") from None
        return MLXBackend(seed=seed, **options)
    raise UserError(f"unknown backend '{name}'; valid backends: cpu, cuda, mlx")
