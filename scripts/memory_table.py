"""Estimated peak GPU memory of one training step on the torch backend: full fine-tuning against LoRA.

The arithmetic of docs/cuda.md's "Memory arithmetic" and of the activation-checkpointing planner
(``backends/torch_cuda/layers.py``: ``MemoryModel``, ``lm_head_workspace``), for one micro-batch of one pair
(2 x max length tokens, a packed row), with every layer checkpointed and with none. Estimates, not measurements.

    python scripts/memory_table.py            # the LoRA rows of docs/cuda.md and docs/lora.md
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redi.backends.torch_cuda.layers import GIB, MemoryModel, lm_head_workspace  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied (as scripts/bench.py)
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 151936, True),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152064, False),
}


def parameter_counts(shape: tuple, rank: int) -> tuple[int, int, int]:
    """(block linear weights, everything else, LoRA adapter parameters on q,k,v,o,gate,up,down)."""
    h, i, n, heads, kv_heads, vocab, tied = shape
    kv = kv_heads * h // heads
    dims = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    block = n * (sum(a * b for a, b in dims) + h + 2 * kv)  # with q/k/v biases
    other = vocab * h * (1 if tied else 2) + n * 2 * h + h  # embeddings, head, norms
    return block, other, n * rank * sum(a + b for a, b in dims)


def estimate(shape: tuple, max_len: int, *, rank: int = 0, checkpoint_all: bool = True,
             bf16_moments: bool = False, chunk: int = 1024) -> float:
    """GiB at the peak of one REDI micro-batch of one pair under bf16 autocast."""
    h, i, n, heads, kv_heads, vocab, _ = shape
    block, other, adapters = parameter_counts(shape, rank)
    if rank:
        # frozen block linears in bf16 (lora.store_frozen_linears), the rest fp32; adapters: fp32 w, g, m, v
        static = 2 * block + 4 * other + 16 * adapters
        head = chunk * vocab * 6 + vocab * h * 2 + math.ceil(chunk * vocab * 2)  # frozen head: no weight grads
    else:
        # fp32 weights, grads, AdamW m and v (bf16 moments: 12), plus the bf16 copies autocast keeps (<= 2)
        static = (12 if bf16_moments else 16) * (block + other) + 2 * (block + other)
        head = lm_head_workspace(chunk, vocab, h)
    memory = MemoryModel(h, kv_heads * h // heads, i, n)
    acts = memory.activation_bytes(2 * max_len, n if checkpoint_all else 0)
    return (static + head + acts + GIB) / GIB  # + 1 GiB: allocator, cuBLAS workspaces (as the planner)


def main() -> None:
    print("| shape | setup | max length | static GiB | every layer checkpointed | no checkpointing |")
    print("|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        block, other, adapters = parameter_counts(shape, 16)
        for label, kw in (("full fine-tuning", {}), ("full, bf16 moments", {"bf16_moments": True}),
                          ("LoRA r=16 (all 7 linears)", {"rank": 16})):
            for max_len in (4096, 16384):
                ckpt, none = estimate(shape, max_len, **kw), estimate(shape, max_len, checkpoint_all=False, **kw)
                static = estimate(shape, 0, **kw) - 1
                print(f"| {name} ({(block + other) / 1e9:.2f} B, LoRA {adapters / 1e6:.0f} M) | {label} | {max_len:,} | "
                      f"{static:.1f} | {ckpt:.1f} | {none:.1f} |")


if __name__ == "__main__":
    main()
