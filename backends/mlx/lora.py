"""LoRA / DoRA on the MLX backend through mlx-lm's tuner layers, with redi/lora.py's conventions (the torch
backend's PEFT maths): the same targets, scale, and seeded A; B = 0 and DoRA's m = row norms of W as mlx-lm
sets them. Adapters are written in the shared folder format (PEFT's and mlx-lm's files side by side).
"""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from redi.errors import UserError
from redi.lora import LoraSpec, initial_a, mlx_to_peft, peft_to_mlx, read_adapter, write_adapter


def wrap(model: nn.Module, spec: LoraSpec, seed: int) -> None:
    """Freeze ``model``, swap the targets of every decoder block for LoRA/DoRA layers, set A from the shared draw."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    config = {"rank": spec.rank, "scale": spec.scale, "dropout": spec.dropout, "keys": _keys(model, spec)}
    linear_to_lora_layers(model, len(model.layers), config, use_dora=spec.dora)
    model.set_dtype(mx.float32)
    layers = lora_layers(model)
    if not layers:
        raise UserError(f"lora_targets {','.join(spec.targets)} match no linear layer of the model's decoder blocks")
    for name, layer in layers:
        rank, in_features = layer.lora_a.shape[1], layer.lora_a.shape[0]
        layer.lora_a = mx.array(initial_a(seed, name, in_features, rank).T)
    set_dropout(model, False)


def set_dropout(model: nn.Module, on: bool) -> None:
    """``lora_dropout`` on for the training forward/backward only (as the torch backend: only where gradients
    flow); reference log-probs, evaluation and generation see the adapters whole."""
    for _, layer in lora_layers(model):
        layer.dropout.train(on)


def _keys(model: nn.Module, spec: LoraSpec) -> list[str]:
    """mlx-lm's ``keys`` (paths inside a block) of the linear layers whose last name is a target."""
    block = model.layers[0]
    return [name for name, m in block.named_modules()
            if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and name.rsplit(".", 1)[-1] in spec.targets]


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "fuse")]


def save_adapter(model: nn.Module, spec: LoraSpec, folder: Path, base_model: str = "") -> None:
    tensors = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.trainable_parameters())}
    write_adapter(folder, spec, mlx_to_peft(tensors), len(model.layers), base_model)


def load_adapter(model: nn.Module, folder: Path) -> None:
    """Load an adapter folder (PEFT's or mlx-lm's file) into the live LoRA layers."""
    tensors = peft_to_mlx(read_adapter(folder))
    live = dict(tree_flatten(model.trainable_parameters()))
    if set(tensors) != set(live) or any(tensors[k].shape != tuple(live[k].shape) for k in live):
        odd = sorted(set(tensors) ^ set(live)) or [k for k in live if tensors[k].shape != tuple(live[k].shape)]
        raise UserError(f"adapter {folder}: {odd[0]} does not match this model's adapters; was it saved with the "
                        "same lora_rank, lora_dora and lora_targets?")
    model.load_weights([(k, mx.array(v)) for k, v in tensors.items()], strict=False)
