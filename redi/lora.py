"""LoRA / DoRA rules shared by the torch (PEFT) and MLX (mlx-lm tuner) backends: one set of config keys,
one scale convention, one seeded initialisation, one adapter folder that both PEFT and mlx-lm load as is.

Conventions (the same mathematics on both backends):
- ``y = W x + scale * B A x`` with ``scale = lora_scale`` (mlx-lm's ``scale``; PEFT's ``lora_alpha / r``, so
  PEFT gets ``lora_alpha = lora_scale * lora_rank``). DoRA rescales each output row of ``W + scale * B A`` to a
  learned magnitude ``m`` (initialised to the row norms of ``W``; the norm is not differentiated).
- B starts at zero; A is drawn here, once, from numpy: uniform(-1/sqrt(in), 1/sqrt(in)) (the bound of both
  PEFT's Kaiming-uniform and mlx-lm's init), seeded by (seed, module name). Both backends overwrite their own
  draw with this one, so one seed gives the same first-step losses on both.
- Targets are module names inside each decoder block; the default is every linear layer of attention and MLP.

The adapter folder holds PEFT's ``adapter_model.safetensors`` (``lora_A.weight`` [r, in], ``lora_B.weight``
[out, r]) and mlx-lm's ``adapters.safetensors`` (``lora_a`` [in, r], ``lora_b`` [r, out]) with one
``adapter_config.json`` carrying both libraries' keys (each ignores the other's).
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from redi.errors import UserError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_WEIGHTS, MLX_WEIGHTS, CONFIG_FILE = "adapter_model.safetensors", "adapters.safetensors", "adapter_config.json"
ADAPTER_DIR = "adapter"  # final/adapter/: the adapter beside the merged model
PEFT_PREFIX = "base_model.model."
# PEFT suffix -> (mlx-lm suffix, transpose?)
_SUFFIXES = {".lora_A.weight": (".lora_a", True), ".lora_B.weight": (".lora_b", True),
             ".lora_magnitude_vector": (".m", False)}


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    scale: float = 20.0
    dropout: float = 0.0
    dora: bool = False
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def alpha(self) -> float:
        """PEFT's lora_alpha for the same scale."""
        return self.scale * self.rank


def parse_targets(raw: str) -> tuple[str, ...]:
    """``lora_targets``: comma-separated module names inside a decoder block; empty: ``DEFAULT_TARGETS``."""
    names = tuple(t.strip() for t in raw.split(",") if t.strip())
    return names or DEFAULT_TARGETS


def spec_from_config(cfg) -> LoraSpec | None:
    """The run's LoRA settings, or None for full fine-tuning (``lora_rank`` 0)."""
    if cfg.lora_rank <= 0:
        if cfg.lora_dora:
            raise UserError("config key 'lora_dora' needs lora_rank > 0")
        return None
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise UserError(f"config key 'lora_dropout' is out of range [0, 1): {cfg.lora_dropout!r}")
    return LoraSpec(cfg.lora_rank, cfg.lora_scale, cfg.lora_dropout, cfg.lora_dora, parse_targets(cfg.lora_targets))


def initial_a(seed: int, module: str, in_features: int, rank: int) -> np.ndarray:
    """A of ``module`` (its name in the HF model, e.g. ``model.layers.0.self_attn.q_proj``), PEFT layout [r, in]."""
    rng = np.random.default_rng([seed, zlib.crc32(module.encode())])
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)


def is_target(module: str, spec: LoraSpec) -> bool:
    """Whether ``module`` (a full HF name) is a LoRA target: inside a decoder block, last name in the targets."""
    return ".layers." in module and module.rsplit(".", 1)[-1] in spec.targets


def _rename_adapter(tensors: dict[str, np.ndarray], suffixes: dict[str, tuple[str, bool]], strip: str,
                    add: str) -> dict[str, np.ndarray]:
    """One rule for both directions: swap each key's LoRA/DoRA suffix, transposing where the layouts differ."""
    out = {}
    for key, value in tensors.items():
        name = key[len(strip):] if strip and key.startswith(strip) else key
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None:
            raise UserError(f"adapter tensor {key}: not a LoRA/DoRA weight")
        new, transpose = suffixes[suffix]
        out[add + name[: -len(suffix)] + new] = np.ascontiguousarray(value.T if transpose else value)
    return out


def peft_to_mlx(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _rename_adapter(tensors, _SUFFIXES, PEFT_PREFIX, "")


def mlx_to_peft(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    back = {mlx: (peft, transpose) for peft, (mlx, transpose) in _SUFFIXES.items()}
    return _rename_adapter(tensors, back, "", PEFT_PREFIX)


def adapter_config(spec: LoraSpec, num_layers: int, base_model: str = "") -> dict:
    """PEFT's LoraConfig fields and mlx-lm's adapter config in one mapping."""
    return {
        # PEFT
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_dora": spec.dora,
        "target_modules": sorted(spec.targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        # mlx-lm
        "fine_tune_type": "dora" if spec.dora else "lora", "num_layers": num_layers,
        "lora_parameters": {"rank": spec.rank, "scale": spec.scale, "dropout": spec.dropout,
                            "keys": mlx_keys(spec)},
    }


def mlx_keys(spec: LoraSpec) -> list[str]:
    """mlx-lm's ``keys``: paths inside a decoder block (Llama/Qwen naming: self_attn.* and mlp.*)."""
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    return [f"{'self_attn' if t in attn else 'mlp'}.{t}" for t in spec.targets]


def write_adapter(folder: Path, spec: LoraSpec, peft_tensors: dict[str, np.ndarray], num_layers: int,
                  base_model: str = "") -> None:
    """Write the adapter folder both libraries load (``peft_tensors`` under PEFT's saved names, fp32)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    peft = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in peft_tensors.items()}
    save_file(peft, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    save_file(peft_to_mlx(peft), str(folder / MLX_WEIGHTS), metadata={"format": "mlx"})
    (folder / CONFIG_FILE).write_text(json.dumps(adapter_config(spec, num_layers, base_model), indent=2))


def read_adapter(folder: Path) -> dict[str, np.ndarray]:
    """PEFT-named tensors of an adapter folder (PEFT's file, or mlx-lm's converted)."""
    from safetensors.numpy import load_file

    if (folder / PEFT_WEIGHTS).exists():
        return load_file(str(folder / PEFT_WEIGHTS))
    if (folder / MLX_WEIGHTS).exists():
        return mlx_to_peft(load_file(str(folder / MLX_WEIGHTS)))
    raise UserError(f"adapter folder {folder}: neither {PEFT_WEIGHTS} nor {MLX_WEIGHTS} there")
