"""Shared fixtures: everything is built locally; nothing is downloaded."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from redi.tiny import TinyQwen2, build_model  # noqa: E402

# A non-trivial init: norm weights away from 1 and larger projections, so RoPE, masking and
# off-by-one errors show up as large log-prob differences instead of hiding near a uniform model.
PARITY_SHAPE = TinyQwen2(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, init_std=0.2, norm_noise=0.3, rope_theta=1000.0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(build_model(tmp_path_factory.mktemp("tiny-model"), shape=PARITY_SHAPE, seed=123))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def force_token(model_dir, token: str) -> int:
    """Rewrite a tiny model's weights so that it emits ``token`` at every step, whatever the prompt: no layer
    writes to the residual stream, every embedding is the same positive vector, and only ``token``'s output
    row is non-zero. Returns the token's id."""
    from pathlib import Path

    import numpy as np
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


@pytest.fixture(scope="session")
def im_end_model_dir(tmp_path_factory) -> str:
    """A tiny model that always says <|im_end|> (not its EOS, <|endoftext|>)."""
    path = build_model(tmp_path_factory.mktemp("im-end-model"), shape=PARITY_SHAPE, seed=5)
    force_token(path, "<|im_end|>")
    return str(path)
