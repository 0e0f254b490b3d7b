"""Models for vLLM: its CPU attention kernels take head_dim 32 and up (the shared tiny shape has 8)."""
from __future__ import annotations

import pytest

from redi.tiny import TinyQwen2, build_model, force_token

VLLM_SHAPE = TinyQwen2(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, init_std=0.2, norm_noise=0.3, rope_theta=1000.0)


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory) -> str:
    return str(build_model(tmp_path_factory.mktemp("vllm-model"), shape=VLLM_SHAPE, seed=123))


@pytest.fixture(scope="session")
def vllm_im_end_model_dir(tmp_path_factory) -> str:
    path = build_model(tmp_path_factory.mktemp("vllm-im-end"), shape=VLLM_SHAPE, seed=5)
    force_token(path, "<|im_end|>")
    return str(path)
