"""Model directories in and out of MLX, in the HF format both backends share.

Loading goes through mlx-lm's model classes (``mlx_lm.utils.load_model``), never its tokenizer: the core
tokenizes with transformers, so mlx-lm's Qwen2 tokenizer override cannot change any ids here.
Saving writes what the torch backend writes: safetensors with HF parameter names (mlx-lm's Qwen2/Llama
names are HF's), a config.json with a top-level ``rope_theta``, and the tokenizer files.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from redi.backend import edit_model_config
from redi.errors import UserError
from redi.hub import locate
from redi.model_dir import copy_tokenizer_files, rope_theta_on_top

# transformers' save_pretrained default; a 7B model in fp32 (28 GB) still fits one file.
MAX_SHARD_BYTES = 50 * 10**9


def resolve_path(model_path: str) -> Path:
    """A local directory, or a hub name resolved through the local HF cache (downloads only when online)."""
    local = locate(model_path, "model", "model path")
    if isinstance(local, Path):
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except Exception as err:  # noqa: BLE001 - any hub failure is the user's missing model
        raise UserError(f"cannot load model {model_path}: {str(err).splitlines()[0]}") from None


def config_overrides(config: dict) -> dict:
    """What mlx-lm must be told that transformers 5 writes only inside ``rope_parameters``."""
    rope = config.get("rope_parameters") or {}
    extra = rope_theta_on_top(config)
    if not config.get("rope_scaling") and rope.get("rope_type", "default") != "default":
        extra["rope_scaling"] = rope
    return extra


def load_model(model_path: str, edits: dict | None = None) -> tuple[nn.Module, dict, Path]:
    """The model with fp32 weights, the on-disk config with the run's ``model_config`` edits (what save_model
    writes back, so checkpoints keep the edits), and its folder."""
    from mlx_lm.utils import load_model as mlx_load_model

    path = resolve_path(model_path)
    if not (path / "config.json").exists():
        raise UserError(f"cannot load model from {model_path}: no config.json there")
    config = edit_model_config(json.loads((path / "config.json").read_text()), edits, str(path))
    try:
        # mlx-lm re-reads config.json and updates it with model_config: hand it every edited key.
        changed = {k: config[k] for k in edits or {} if k in config}
        model, _ = mlx_load_model(path, model_config={**changed, **config_overrides(config)})
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise UserError(f"cannot load model from {model_path}: {str(err).splitlines()[0]}") from None
    # fp32 master weights always: stage 2's lr (1e-6) is below bf16's resolution (platform-notes.md).
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model, config, path


def hf_weights(model: nn.Module) -> dict[str, mx.array]:
    """Full weights under HF names; LoRA/DoRA layers are fused on the fly, the training model is untouched."""
    weights = dict(tree_flatten(model.parameters()))
    for name, module in model.named_modules():
        if hasattr(module, "fuse") and hasattr(module, "lora_a"):
            for key in [k for k in weights if k.startswith(name + ".")]:
                del weights[key]
            # Fuse in fp32: mlx-lm casts the low-rank delta to the base's dtype, which is bf16 under
            # precision bf16 and would round the adapters away.
            base = module.linear.weight
            module.linear.weight = base.astype(mx.float32)
            try:
                fused = module.fuse()
            finally:
                module.linear.weight = base
            weights.update({f"{name}.{k}": v for k, v in tree_flatten(fused.parameters())})
    return {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in sorted(weights.items())}


def _shards(weights: dict[str, mx.array]) -> list[dict[str, mx.array]]:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for k, v in weights.items():
        if shards[-1] and size + v.nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    return shards


def save_model(model: nn.Module, config: dict, source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    weights = hf_weights(model)
    mx.eval(list(weights.values()))
    shards = _shards(weights)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for name, shard in zip(names, shards):
        # "pt" is what transformers expects in the header of a checkpoint it did not write itself.
        mx.save_safetensors(str(out / name), shard, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = dict(config)
    cfg.update(config_overrides(config))
    cfg["dtype"] = "float32"
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = "float32"
    cfg.pop("quantization", None)
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    copy_tokenizer_files(source, out)


def read_weights(folder: Path) -> dict[str, mx.array]:
    files = sorted(glob.glob(str(folder / "model*.safetensors")))
    if not files:
        raise UserError(f"checkpoint {folder} has no model*.safetensors")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(f))
    return weights


def load_weights(model: nn.Module, folder: Path) -> None:
    """Checkpoint weights into the (full fine-tuning) model, in fp32; refuses a checkpoint of another shape."""
    weights = model.sanitize(read_weights(folder)) if hasattr(model, "sanitize") else read_weights(folder)
    own = dict(tree_flatten(model.parameters()))
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise UserError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
