"""LoRA / DoRA on the torch backend through PEFT, with redi/lora.py's conventions (the MLX backend's maths).

PEFT injects its layers into the transformers model in place; the backend keeps training that model, so
the packed log-prob path, activation checkpointing and the optimizer see an ordinary module whose only
trainable parameters are the adapters (AdamW state exists for those alone). Merging for ``final/`` is done
out of place in fp32: the live weights are never merged and unmerged, so resume stays bit-exact.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from redi.errors import UserError
from redi.lora import (ADAPTER_DIR, PEFT_PREFIX, LoraSpec, initial_a, is_target, read_adapter,
                       write_adapter)

ADAPTER = "default"  # PEFT's adapter name
OPTIMIZER_FILE = "optimizer.pt"  # as the full fine-tuning checkpoint's


def wrap(model: torch.nn.Module, spec: LoraSpec, seed: int, frozen_dtype: torch.dtype | None = None) -> None:
    """Inject LoRA/DoRA layers into ``model`` (in place, base frozen) and set A from the shared seeded draw.
    ``frozen_dtype`` (bf16 under CUDA autocast): store the frozen linear layers of the blocks in it."""
    from peft import LoraConfig, get_peft_model

    targets = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and is_target(name, spec)]
    if not targets:
        raise UserError(f"lora_targets {','.join(spec.targets)} match no linear layer of the model's decoder blocks")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, use_dora=spec.dora,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, config)  # injects into ``model``; the PeftModel wrapper itself is not needed
    with torch.no_grad():
        for name, layer in lora_layers(model):
            a = layer.lora_A[ADAPTER].weight
            a.copy_(torch.from_numpy(initial_a(seed, name, a.shape[1], a.shape[0])))
        if spec.dropout:
            for _, layer in lora_layers(model):
                layer.lora_dropout[ADAPTER] = TrainingDropout(spec.dropout)
    if frozen_dtype is not None:
        store_frozen_linears(model, frozen_dtype)


class TrainingDropout(torch.nn.Dropout):
    """``lora_dropout`` only where gradients flow: reference log-probs, evaluation and generation (no_grad)
    see the adapters whole, as the MLX backend does (``mlx_lora.set_dropout``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if torch.is_grad_enabled() else x


def store_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Under bf16 autocast a linear layer multiplies bf16 copies of its weight and bias anyway, so storing the
    frozen ones in bf16 gives the same products (bit for bit when the checkpoint was bf16, as released models
    are) at half the memory: 7B's block weights take 13 GB instead of 26. Embeddings, norms and the LM head
    stay fp32 (the residual stream stays fp32); the adapters keep fp32 masters."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and not module.weight.requires_grad:
            module.to(dtype)


def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _adapter_params(layer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """PEFT's saved suffixes -> the live parameters of one LoRA layer."""
    params = {".lora_A.weight": layer.lora_A[ADAPTER].weight, ".lora_B.weight": layer.lora_B[ADAPTER].weight}
    if ADAPTER in getattr(layer, "lora_magnitude_vector", {}):
        params[".lora_magnitude_vector"] = layer.lora_magnitude_vector[ADAPTER].weight
    return params


def adapter_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The adapters under PEFT's saved names (``get_peft_model_state_dict``'s keys), fp32 numpy."""
    out = {}
    for name, layer in lora_layers(model):
        for suffix, param in _adapter_params(layer).items():
            out[PEFT_PREFIX + name + suffix] = param.detach().float().cpu().numpy()
    return out


def load_adapter(model: torch.nn.Module, folder: Path) -> None:
    """Copy an adapter folder's tensors (PEFT's or mlx-lm's file) into the live LoRA layers, bit for bit."""
    tensors = read_adapter(folder)
    expected = set()
    with torch.no_grad():
        for name, layer in lora_layers(model):
            for suffix, param in _adapter_params(layer).items():
                key = PEFT_PREFIX + name + suffix
                expected.add(key)
                if key not in tensors or tuple(tensors[key].shape) != tuple(param.shape):
                    raise UserError(f"adapter {folder}: {key} missing or of another shape; was it saved with "
                                    "the same lora_rank, lora_dora and lora_targets?")
                param.copy_(torch.from_numpy(tensors[key]))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise UserError(f"adapter {folder}: {extra[0]} is not an adapter of this model")


def merged_weight(layer: torch.nn.Module) -> torch.Tensor:
    """W + scale * B A (LoRA), or its rows rescaled to the magnitude m (DoRA), in fp32; as mlx-lm's ``fuse``."""
    base = layer.get_base_layer().weight.detach().float()
    a, b = layer.lora_A[ADAPTER].weight.detach().float(), layer.lora_B[ADAPTER].weight.detach().float()
    weight = base + (layer.scaling[ADAPTER] * b) @ a
    if ADAPTER in getattr(layer, "lora_magnitude_vector", {}):
        m = layer.lora_magnitude_vector[ADAPTER].weight.detach().float()
        weight = (m / weight.norm(dim=1))[:, None] * weight
    return weight


def merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict under the base model's names with every adapter merged in (out of place)."""
    state = {name.replace(".base_layer.", "."): t.detach() for name, t in model.state_dict().items()
             if ".lora_" not in name}
    for name, layer in lora_layers(model):
        state[name + ".weight"] = merged_weight(layer)
    return state


def save_adapter(model: torch.nn.Module, spec: LoraSpec, folder: Path, base_model: str = "") -> None:
    write_adapter(folder, spec, adapter_tensors(model), len(model.get_decoder().layers), base_model)


def save_checkpoint(model: torch.nn.Module, spec: LoraSpec, optimizer, folder: Path, base_model: str) -> None:
    """A LoRA checkpoint: the adapter folder's files and ``optimizer.pt`` (the adapters' AdamW state); no base."""
    save_adapter(model, spec, folder, base_model)
    torch.save({"optimizer": optimizer.state_dict() if optimizer else None}, folder / OPTIMIZER_FILE)


def load_checkpoint(model: torch.nn.Module, optimizer, folder: Path, device: torch.device) -> None:
    load_adapter(model, folder)
    state = torch.load(folder / OPTIMIZER_FILE, map_location=device, weights_only=True)["optimizer"]
    if state is not None and optimizer is not None:
        optimizer.load_state_dict(state)


def adapter_dir(model_dir: Path) -> Path:
    """Where ``final/`` (and ``sft_final/``) keep the adapter beside the merged weights."""
    return model_dir / ADAPTER_DIR


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
