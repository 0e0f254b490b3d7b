"""The benchmark's model and data, shared by ``bench.py`` (ours) and ``bench_trl.py`` (TRL's trainers).

A random-init model of a named shape; trl_baseline.py's synthetic pairs (prompt 256 tokens, log-normal
completions capped to the max length), as ids, from the same random stream.
"""
from __future__ import annotations

import math
import random

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "tiny": (64, 128, 2, 4, 2, 32003, True),  # trl_baseline.py --tiny
}
VOCAB_WORDS = 32000  # trl_baseline.py's word-level vocabulary: "w{i}" -> id i + 3; <pad> 0, <eos> 1
EOS = 1


def synthetic_pairs(n: int, max_len: int, tiny: bool) -> list[tuple[list[int], list[int], list[int]]]:
    """trl_baseline.py's data, as ids: the same random stream, so the same lengths and tokens."""
    rng = random.Random(0)
    prompt_len = 16 if tiny else 256

    def words(k: int) -> list[int]:
        return [rng.randrange(VOCAB_WORDS) + 3 for _ in range(k)]

    def comp_len() -> int:
        hi = max_len - prompt_len - 1
        return max(16, min(hi, int(rng.lognormvariate(math.log(hi * 0.45), 0.5))))

    out = []
    for _ in range(n):
        prompt = words(prompt_len)
        chosen = words(comp_len())
        rejected = words(comp_len())
        out.append((prompt, chosen + [EOS], rejected + [EOS]))
    return out


def make_model(shape: str, max_len: int, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h, i, n_layers, heads, kv, vocab, tied = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(max_len, 32768),
                      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, pad_token_id=0,
                      eos_token_id=EOS, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(cfg)


def peak_gib(device: torch.device) -> float:
    """Peak GPU memory since the last reset; on the CPU the process's peak RSS so far (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
