"""Per-sequence completion log-prob sums on MLX without ``[tokens x vocab]`` logits.

Same contract as ``backends/torch_cuda/logprobs.py``: only hidden states at completion positions reach the
LM head, ``chunk`` rows at a time, and each chunk runs under ``mx.checkpoint`` when differentiated so its
``[chunk x vocab]`` logits are recomputed in the backward pass instead of being kept.

The gather indices are built in numpy and padded to a multiple of ``ROUND`` rows, so the shapes MLX sees
depend only on (batch, padded width, padded completion-token count): few distinct shapes per run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ROUND = 32
KEEP_LOGITS_BYTES = 256 << 20  # fp32 [tokens x vocab] logits autograd may keep instead of recomputing chunks
# MLX's CPU reductions add a whole axis into one running fp32 sum: over a 49k vocabulary the small exp terms
# round away and logsumexp comes out low, so every log-prob was ~1e-4 nats high on SmolLM2 (torch: ~1e-8;
# docs/real-model.md). Summing blocks of this many first, then the block sums, keeps it to ~1e-6.
BLOCK = 256


def blocked_sum(x: mx.array) -> mx.array:
    """Sum over the last axis in levels of at most ``BLOCK`` terms (a radix-256 pairwise sum): the accuracy
    torch's cascade sum has, where MLX's CPU ``sum`` accumulates the whole axis sequentially."""
    while x.shape[-1] > BLOCK:
        pad = (-x.shape[-1]) % BLOCK
        if pad:
            x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
        x = x.reshape(*x.shape[:-1], -1, BLOCK).sum(axis=-1)
    return x.sum(axis=-1)


def logsumexp(logits: mx.array) -> mx.array:
    """``mx.logsumexp`` over the last axis with ``blocked_sum`` (same value and gradient, softmax)."""
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    return mx.log(blocked_sum(mx.exp(logits - top))) + top[..., 0]


@dataclass
class Scored:
    """Where the scored tokens of a padded micro-batch are, as arrays ready for MLX."""

    input_ids: mx.array  # [B, W] int32
    positions: mx.array  # [N] flat index b*W + t of the hidden state that predicts each scored token
    targets: mx.array  # [N] the scored token ids
    segments: mx.array  # [B, N] float32: 1 where scored row j belongs to sequence b (0 on padding rows)
    lengths: np.ndarray  # [B] int64: completion tokens scored per sequence (L)

    def arrays(self) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        return self.input_ids, self.positions, self.targets, self.segments


def scored_positions(padded: dict[str, np.ndarray]) -> Scored:
    """``label_mask[b, t] = 1`` marks token t as scored; it is predicted from position t-1 (as in torch)."""
    ids, labels = padded["input_ids"], padded["label_mask"]
    b, w = ids.shape
    scored = labels[:, 1:].astype(bool)
    rows, cols = np.nonzero(scored)
    n = len(rows)
    n_pad = max(ROUND, int(math.ceil(n / ROUND) * ROUND))
    positions = np.zeros(n_pad, dtype=np.int32)
    targets = np.zeros(n_pad, dtype=np.int32)
    segments = np.zeros((b, n_pad), dtype=np.float32)
    positions[:n] = rows * w + cols
    targets[:n] = ids[rows, cols + 1]
    segments[rows, np.arange(n)] = 1.0
    return Scored(mx.array(ids.astype(np.int32)), mx.array(positions), mx.array(targets), mx.array(segments),
                  scored.sum(axis=1).astype(np.int64))


def lm_head(model: nn.Module) -> tuple[nn.Module, str]:
    """The module that maps hidden states to logits and how to call it (tied models reuse the embedding)."""
    if "lm_head" in model:
        return model["lm_head"], "__call__"
    return model.model.embed_tokens, "as_linear"


def _chunk_logps(head: nn.Module, method: str, targets: mx.array):
    project = getattr(head, method)

    def chunk_logps(h: mx.array) -> mx.array:
        # Logits in the compute dtype (bf16 on the option), log-softmax in fp32 as torch autocast does.
        logits = project(h).astype(mx.float32)
        picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return picked - logsumexp(logits)

    return chunk_logps


def token_logps(model: nn.Module, hidden: mx.array, targets: mx.array, chunk: int, checkpoint: bool) -> mx.array:
    """log p(target | hidden) for each row of ``hidden`` [N, H]; returns fp32 [N]."""
    head, method = lm_head(model)
    parts = []
    for s in range(0, hidden.shape[0], chunk):
        # Targets are closed over, not passed: mx.checkpoint differentiates every argument it is given.
        fn = _chunk_logps(head, method, targets[s:s + chunk])
        if checkpoint:
            # nn.utils.checkpoint passes the head's trainable parameters explicitly, so they get gradients.
            fn = nn.utils.checkpoint(head, fn)
        parts.append(fn(hidden[s:s + chunk]))
    return mx.concatenate(parts) if len(parts) > 1 else parts[0]


def decoder_hidden(model: nn.Module, input_ids: mx.array) -> mx.array:
    """Final (normed) hidden states [B, W, H]. Right padding needs no mask beyond the causal one: pad tokens
    sit after every real token, so no real position attends to them."""
    return model.model(input_ids)


def sequence_logps(model: nn.Module, input_ids: mx.array, positions: mx.array, targets: mx.array,
                   segments: mx.array, chunk: int, *, differentiable: bool) -> mx.array:
    """S: fp32 sum of completion-token log-probs, one per row (arrays as in ``Scored``)."""
    hidden = decoder_hidden(model, input_ids)
    b, w, h = hidden.shape
    picked = mx.take(hidden.reshape(b * w, h), positions, axis=0)
    # Short rows: the logits of every chunk fit in KEEP_LOGITS_BYTES, so autograd keeps them and the backward
    # needs no second LM-head matmul per chunk (profiled on SmolLM2-135M, short rows); long rows recompute.
    vocab = lm_head(model)[0].weight.shape[0]
    keep = picked.shape[0] * vocab * 4 <= KEEP_LOGITS_BYTES
    per_token = token_logps(model, picked, targets, chunk, checkpoint=differentiable and not keep)
    return (segments * per_token[None, :]).sum(axis=1)
