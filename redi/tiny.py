"""Local, deterministic tokenizers and random-init Qwen2 models: nothing is downloaded, ever.

Weights are drawn with numpy from the seed and written as safetensors, so every backend (torch, MLX)
starts from bit-identical parameters. Two traps from platform-notes.md are handled here:
- ``config.json`` carries a top-level ``rope_theta`` (mlx-lm ignores ``rope_parameters`` and would fall back
  to 1e6 silently);
- the tokenizer uses Qwen2's own normaliser and pre-tokenizer, because transformers and mlx-lm force
  ``Qwen2Tokenizer`` for ``model_type: qwen2`` and rebuild the pre-tokenizer, which would change the ids.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Qwen2's pre-tokenizer split pattern (tokenization_qwen2.PRETOKENIZE_REGEX).
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML as Qwen uses it; an optional system turn is injected only when the caller gives one.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_ALPHABET = "0123456789+-*/=?>()[]{}\\.,:; \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable-character map used by every ByteLevel BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(out_dir: str | Path, alphabet: str = DEFAULT_ALPHABET) -> int:
    """Write a character-level Qwen2-compatible tokenizer to ``out_dir``; returns the vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b2u = _bytes_to_unicode()
    symbols = sorted({b2u[b] for ch in alphabet for b in ch.encode("utf-8")})
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "unk_token": None,
                "model_max_length": 131072,
                "chat_template": CHATML_TEMPLATE,
            },
            indent=2,
        )
    )
    return tok.get_vocab_size()


@dataclass(frozen=True)
class TinyQwen2:
    """Shape of a small Qwen2 model. Defaults give ~0.1M parameters: a training step in milliseconds."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    # Norm weights of exactly 1 and tiny projections make a near-uniform model that hides RoPE and
    # masking bugs; parity tests raise both.
    norm_noise: float = 0.0


def qwen2_config(shape: TinyQwen2, vocab_size: int, eos_token_id: int) -> dict:
    s = asdict(shape)
    for k in ("init_std", "norm_noise"):
        s.pop(k)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_cache": True,
        "use_sliding_window": False,
        "torch_dtype": "float32",
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        **s,
    }


def random_qwen2_weights(shape: TinyQwen2, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """HF-named fp32 weights drawn from ``seed`` (numpy PCG64: identical on every platform)."""
    rng = np.random.default_rng(seed)
    h, i = shape.hidden_size, shape.intermediate_size
    head_dim = h // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim

    def normal(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims) * shape.init_std).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + rng.standard_normal(h) * shape.norm_noise).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(vocab_size, h)}
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        w[p + "self_attn.q_proj.weight"] = normal(h, h)
        w[p + "self_attn.q_proj.bias"] = normal(h)
        w[p + "self_attn.k_proj.weight"] = normal(kv, h)
        w[p + "self_attn.k_proj.bias"] = normal(kv)
        w[p + "self_attn.v_proj.weight"] = normal(kv, h)
        w[p + "self_attn.v_proj.bias"] = normal(kv)
        w[p + "self_attn.o_proj.weight"] = normal(h, h)
        w[p + "mlp.gate_proj.weight"] = normal(i, h)
        w[p + "mlp.up_proj.weight"] = normal(i, h)
        w[p + "mlp.down_proj.weight"] = normal(h, i)
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
    w["model.norm.weight"] = norm()
    if not shape.tie_word_embeddings:
        w["lm_head.weight"] = normal(vocab_size, h)
    return w


def build_model(
    out_dir: str | Path, *, shape: TinyQwen2 = TinyQwen2(), seed: int = 0, alphabet: str = DEFAULT_ALPHABET
) -> Path:
    """Write tokenizer + config + random safetensors weights: a model directory any HF loader accepts."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    vocab_size = build_tokenizer(out, alphabet)
    eos_id = vocab_size - len(SPECIAL_TOKENS)  # "<|endoftext|>" is the first special token added
    (out / "config.json").write_text(json.dumps(qwen2_config(shape, vocab_size, eos_id), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}, indent=2)
    )
    save_file(random_qwen2_weights(shape, vocab_size, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def force_token(model_dir, token: str) -> int:
    """Rewrite a tiny model's weights so that it emits ``token`` at every step, whatever the prompt: no layer
    writes to the residual stream, every embedding is the same positive vector, and only ``token``'s output
    row is non-zero. Returns the token's id."""
    from safetensors.numpy import load_file, save_file
    from transformers import AutoTokenizer

    path = Path(model_dir) / "model.safetensors"
    weights = load_file(str(path))
    token_id = AutoTokenizer.from_pretrained(str(model_dir)).convert_tokens_to_ids(token)
    for name, value in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = np.zeros_like(value)
    weights["model.norm.weight"] = np.ones_like(weights["model.norm.weight"])
    weights["model.embed_tokens.weight"] = np.ones_like(weights["model.embed_tokens.weight"])
    head = np.zeros_like(weights["lm_head.weight"])
    head[token_id] = 10.0
    weights["lm_head.weight"] = head
    save_file(weights, str(path), metadata={"format": "pt"})
    return token_id
