"""redi.gguf without the real model (tests/test_real_model.py has it): the missing-extra line, names, and the
Q/K row permutation undone exactly as llama.cpp's convert_hf_to_gguf.py applies it."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from redi.errors import UserError
from redi.gguf import hf_name, model_folder, unpermute_qk


def test_without_the_gguf_package_one_line_names_the_extra(tmp_path, monkeypatch):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(UserError, match=r"pip install 'redi\[gguf\]'"):
        model_folder(str(fake))


def test_other_models_pass_through_and_a_missing_file_is_named(tmp_path):
    assert model_folder("runs/x/final") == "runs/x/final"
    with pytest.raises(UserError, match="model path not found: .*nope.gguf"):
        model_folder(str(tmp_path / "nope.gguf"))


def test_tensor_names():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("blk.11.ffn_down.weight") == "model.layers.11.mlp.down_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("which,heads", [("attn_q", 4), ("attn_k", 2)])
def test_q_and_k_rows_come_back(which, heads):
    config = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}
    hf = np.random.default_rng(0).standard_normal((heads * 8, 5)).astype(np.float32)
    back = unpermute_qk(_llama_cpp_permute(hf, heads), f"blk.0.{which}.weight", config)
    np.testing.assert_array_equal(back, hf)
    assert not np.array_equal(_llama_cpp_permute(hf, heads), hf)
    qwen = {**config, "model_type": "qwen2"}  # Qwen2 files are not permuted
    np.testing.assert_array_equal(unpermute_qk(hf, f"blk.0.{which}.weight", qwen), hf)
