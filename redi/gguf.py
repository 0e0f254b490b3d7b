"""``--model X.gguf``: a llama.cpp file converted once into an fp32 HF folder that every backend loads.

The folder is cached by the file's content hash under ``$REDI_CACHE`` (default ``~/.cache/redi``), in
``gguf/<sha256[:16]>-v<CONVERTER_VERSION>``. It is written into a temporary folder beside it and renamed into
place, so a kill at any instant leaves no half entry (the kill point ``gguf_convert`` sits before the rename).

Torch-free on purpose (a Mac with MLX and no torch must read a GGUF too): ``gguf`` reads and dequantizes
(``gguf.quants``), numpy and safetensors write. What follows transformers' own GGUF loader
(``modeling_gguf_pytorch_utils.load_gguf_checkpoint``; tests/test_real_model.py checks equal tensors and
logits against it):
- tensor names ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` and so on;
- llama.cpp permutes the rows of a Llama Q and K projection (rotary halves interleaved); undone here
  (``LlamaTensorProcessor._reverse_permute_weights``). Qwen2 files are not permuted;
- the config from the ``<arch>.*`` keys, tied embeddings when the file has no ``output.weight``;
- the tokenizer through transformers' GGUF tokenizer converter (built on ``tokenizers``, no torch).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from redi.atomic import fsync_dir, kill_point
from redi.errors import UserError

CONVERTER_VERSION = 1  # bump when the folder written changes: old cache entries are then rebuilt
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SHARD_BYTES = 2 * 10**9  # one safetensors file per ~2 GB, so a 7B model converts without 28 GB in memory
END_OF_TURN = "<|im_end|>"

LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONFIG_KEYS = {  # <arch>.KEY in the file -> config.json key
    "block_count": "num_hidden_layers", "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta",
}


def is_gguf(spec: str) -> bool:
    return str(spec).lower().endswith(".gguf")


def model_folder(spec: str) -> str:
    """``spec`` as is, unless it names a .gguf file: then its converted HF folder (built on first use)."""
    if not is_gguf(spec):
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"model path not found: {spec}")
    gguf = _import_gguf()
    out = cache_root() / "gguf" / f"{content_hash(path)[:16]}-v{CONVERTER_VERSION}"
    if not (out / "config.json").is_file():
        _remove_stale_tmp(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        convert(gguf.GGUFReader(str(path)), tmp, source=path)
        kill_point("gguf_convert")
        _rename_into_place(tmp, out)
    source = json.loads((out / "redi_gguf.json").read_text())
    print(f"model {path.name}: {source['dequantized']}; HF folder {out}", file=sys.stderr)
    return str(out)


def _import_gguf():
    try:
        import gguf  # noqa: PLC0415 - optional extra, imported only for a .gguf model

        return gguf
    except ImportError:
        raise UserError("a .gguf model needs the gguf package: pip install 'redi[gguf]'") from None


def cache_root() -> Path:
    return Path(os.environ.get("REDI_CACHE") or Path.home() / ".cache" / "redi").expanduser()


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_stale_tmp(out: Path) -> None:
    """Temporary folders a killed conversion left (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*") if out.parent.is_dir() else []:
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rename_into_place(tmp: Path, out: Path) -> None:
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished the same conversion first: keep its folder
        if not (out / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(out.parent)


# ---------------------------------------------------------------------------------------------- conversion

def convert(reader, out: Path, *, source: Path | None = None) -> None:
    """Write config.json, generation_config.json, the tokenizer and fp32 safetensors for a GGUFReader."""
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{source}: GGUF architecture '{arch}' is not supported (supported: "
                        f"{', '.join(ARCHITECTURES)})")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or meta.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise UserError(f"{source}: scaled rotary embeddings (rope_freqs / rope.scaling) are not supported")
    config = hf_config(meta, arch, names)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(meta))
    _save_tokenizer(meta, arch, out)
    kinds = _write_weights(reader, config, out)
    _write_json(out / "redi_gguf.json", {
        "source": str(source), "sha256": content_hash(source) if source else None,
        "converter_version": CONVERTER_VERSION, "dequantized": dequantized_line(kinds)})


def dequantized_line(kinds: Counter) -> str:
    """``Q4_1 x210, Q8_0 x1 -> fp32 (F32 x61 as they are)``: the quantized kinds, commonest first."""
    plain = {"F32", "F16", "BF16"}
    quantized = ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common() if kind not in plain) or "nothing"
    kept = ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common() if kind in plain)
    return f"{quantized} -> fp32" + (f" ({kept} as they are)" if kept else "")


def _metadata(reader) -> dict:
    """Every key as a Python value (the tokenizer's arrays as lists), the GGUF header's own keys left out."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def hf_config(meta: dict, arch: str, tensor_names: set[str]) -> dict:
    """The transformers config.json: the ``<arch>.*`` keys, the special token ids, tied embeddings."""
    config: dict = {"architectures": [ARCHITECTURES[arch]], "model_type": arch, "hidden_act": "silu",
                    "dtype": "float32", "use_cache": True}
    for key, name in CONFIG_KEYS.items():
        if f"{arch}.{key}" in meta:
            config[name] = meta[f"{arch}.{key}"]
    config["vocab_size"] = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    if arch == "llama" and f"{arch}.rope.dimension_count" in meta:
        config["head_dim"] = meta[f"{arch}.rope.dimension_count"]
    config["rope_theta"] = config.get("rope_theta", 10000.0)
    # transformers 5 reads rope_parameters; mlx-lm reads the top-level rope_theta (redi/model_dir.py): both.
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    if arch == "llama":  # Qwen2 always has Q/K/V biases; a Llama file says by having them
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id"), ("unknown_token_id", "unk_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[name] = meta[f"tokenizer.ggml.{key}"]
    return config


def _generation_config(meta: dict) -> dict:
    """EOS from the file, plus ``<|im_end|>`` when the chat template ends turns with it (a ChatML model whose
    file names ``<|endoftext|>`` as EOS would otherwise talk past its turn)."""
    eos = [meta["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in meta else []
    template = meta.get("tokenizer.chat_template") or ""
    tokens = meta["tokenizer.ggml.tokens"]
    if END_OF_TURN in template and END_OF_TURN in tokens and tokens.index(END_OF_TURN) not in eos:
        eos.append(tokens.index(END_OF_TURN))
    config: dict = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
    for key, name in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[name] = meta[f"tokenizer.ggml.{key}"]
    return config


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save_tokenizer(meta: dict, arch: str, out: Path) -> None:
    """transformers' GGUF tokenizer converter (torch-free), saved as an ordinary tokenizer folder."""
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                           convert_gguf_tokenizer)
    except ImportError:  # transformers before the integrations.gguf package
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    hf_logging.set_verbosity_error()
    groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                      if f"tokenizer.{key}" in meta}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    backend, extra = convert_gguf_tokenizer(arch, groups["tokenizer"])
    tokens = meta["tokenizer.ggml.tokens"]
    specials = {name: tokens[meta[f"tokenizer.ggml.{key}"]]
                for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                  ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
                if f"tokenizer.ggml.{key}" in meta}
    settings = {k: v for k, v in groups["tokenizer_config"].items() if k != "chat_template"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials, **settings, **extra)
    if meta.get("tokenizer.chat_template"):
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    tokenizer.save_pretrained(str(out))


def _write_weights(reader, config: dict, out: Path) -> Counter:
    """Dequantize tensor by tensor into fp32 safetensors shards; the kinds of tensor seen, counted."""
    from safetensors.numpy import save_file

    kinds: Counter = Counter()
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise UserError(f"GGUF tensor '{tensor.name}' has no place in a {config['architectures'][0]}")
        kinds[tensor.tensor_type.name] += 1
        weight = unpermute_qk(dequantize(tensor), tensor.name, config)
        if size and size + weight.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = weight
        size += weight.nbytes
    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, shard in zip(files, shards):
        save_file(shard, str(out / file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {name: file for file, shard in zip(files, shards) for name in shard}
        total = sum(w.nbytes for shard in shards for w in shard.values())
        _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": index})
    return kinds


def dequantize(tensor) -> np.ndarray:
    from gguf.quants import dequantize as gguf_dequantize

    return np.ascontiguousarray(gguf_dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None for an unknown name."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    return None


def unpermute_qk(weight: np.ndarray, gguf_name: str, config: dict) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (Llama only): rows were reordered per head so that the rotary
    halves interleave; transformers rotates halves, so the rows go back."""
    if config["model_type"] != "llama" or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        return weight
    heads = config["num_attention_heads"] if ".attn_q." in gguf_name else config["num_key_value_heads"]
    rows = weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(rows.swapaxes(2, 1).reshape(weight.shape))
