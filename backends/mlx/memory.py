"""Back-of-envelope peak memory of an MLX training step, from parameter, optimizer and activation sizes.

    python -m redi.backends.mlx.memory            # the table in docs/mlx.md (Qwen2.5-Math-1.5B)

The method (docs/mlx.md explains each line): static state (weights, gradients, AdamW moments) plus the
largest live activation set of one micro-batch under per-layer gradient checkpointing: every layer's input,
one layer's recomputed internals with their gradients, one layer's attention matrices when the attention
backward is not fused, and one LM-head chunk of fp32 logits.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Shape:
    hidden: int = 1536
    intermediate: int = 8960
    layers: int = 28
    heads: int = 12
    kv_heads: int = 2
    vocab: int = 151936
    tied: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * per_layer + h

    def lora_parameters(self, rank: int) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        # q, k, v, o, gate, up, down: rank x (in + out) each, on every layer (mlx-lm's default keys).
        dims = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
        return self.layers * rank * sum(a + b for a, b in dims)

    def largest_tensor(self) -> int:
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


def layer_internals(hidden: int, intermediate: int, kv: int) -> int:
    """Elements one decoder layer's forward keeps per token for its backward (the planner's unit too)."""
    return 7 * hidden + 2 * kv + 4 * intermediate


def estimate(shape: Shape, seq_len: int, seqs: int, *, lora_rank: int = 0, compute_bytes: int = 4,
             state_bytes: int = 4, fused_attention_backward: bool = True, lm_head_chunk: int = 1024) -> dict[str, float]:
    """Bytes of each part at the peak of one micro-batch of ``seqs`` sequences padded to ``seq_len``."""
    p, c, tokens = shape.parameters(), compute_bytes, seq_len * seqs
    parts: dict[str, float] = {}
    if lora_rank:
        a = shape.lora_parameters(lora_rank)
        parts["frozen base weights"] = p * c  # held in the compute dtype (bf16 option) or fp32
        parts["adapters: weights + grads + AdamW m, v (fp32)"] = 16 * a
        step_transient = 0.0
    else:
        parts["weights (fp32 masters)"] = 4 * p
        parts["gradient accumulator (fp32)"] = 4 * p
        parts["AdamW m and v"] = 2 * state_bytes * p  # fp32, or bf16 with optim_state_dtype: bf16
        if c != 4:
            parts["bf16 copy of the weights for compute"] = c * p
        # A micro-batch's fresh gradient exists beside the accumulator until it is added.
        parts["fresh micro-batch gradient (worst case)"] = 4 * p
        step_transient = (4 + 2 * state_bytes) * shape.largest_tensor()  # one tensor's new weight, m, v
    kv = shape.kv_heads * shape.head_dim
    internals = layer_internals(shape.hidden, shape.intermediate, kv)  # per token, in elements
    parts["checkpointed layer inputs"] = shape.layers * shape.hidden * tokens * c
    parts["one layer recomputed, with gradients"] = 2 * internals * tokens * c
    if not fused_attention_backward:
        # Four [heads, T, T] matrices per sequence (scores, probabilities and their gradients): calibrated
        # against mx.get_peak_memory() on the CPU, whose attention backward is always the unfused one.
        parts["attention matrices of one layer (unfused backward)"] = 4 * shape.heads * seq_len**2 * seqs * c
    parts["LM-head chunk: fp32 logits, softmax, gradient"] = 3 * 4 * lm_head_chunk * shape.vocab
    parts["total"] = sum(parts.values())
    parts["optimizer-step peak"] = sum(v for k, v in parts.items() if k.startswith(("weights", "gradient", "AdamW",
                                                                                  "frozen", "adapters"))) + step_transient
    return parts


def main() -> None:
    shape = Shape()
    print(f"Qwen2.5-Math-1.5B: {shape.parameters() / 1e9:.3f}B parameters, "
          f"LoRA r=16 adapters {shape.lora_parameters(16) / 1e6:.1f}M")
    print("| setup | max length | SFT (1 sequence) | REDI (1 pair = 2 sequences) | REDI, unfused attention backward |")
    print("|---|---|---|---|---|")
    for label, kw in (("full fine-tuning, fp32", {}), ("full fine-tuning, bf16 compute", {"compute_bytes": 2}),
                      ("full fine-tuning, bf16 compute and AdamW state", {"compute_bytes": 2, "state_bytes": 2}),
                      ("LoRA r=16, fp32", {"lora_rank": 16}),
                      ("LoRA r=16, bf16 base and compute", {"lora_rank": 16, "compute_bytes": 2})):
        for length in (4096, 16384):
            cells = [estimate(shape, length, 1, **kw), estimate(shape, length, 2, **kw),
                     estimate(shape, length, 2, fused_attention_backward=False, **kw)]
            print(f"| {label} | {length:,} | " + " | ".join(f"{c['total'] / GB:.1f} GB" for c in cells) + " |")


if __name__ == "__main__":
    main()
