"""Batched sampling with mlx-lm's left-padded KV cache, with the torch backend's semantics.

Same contract as ``TorchBackend.generate``: left-padded prompts, positions counted from each prompt's first
real token (``BatchKVCache`` offsets do that), greedy at temperature 0, nucleus sampling that always keeps
the most likely token, finished rows padded with ``eos_id``, and each output cut after its first eos.
Randomness comes from an explicit key split from ``seed``, so results do not depend on global RNG state
(they are not the torch backend's samples: the two RNGs differ).
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache


def sample_next(logits: mx.array, temperature: float, top_p: float, key: mx.array) -> mx.array:
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    probs = mx.softmax(logits / temperature, axis=-1)
    if top_p < 1.0:
        order = mx.argsort(-probs, axis=-1)
        sorted_p = mx.take_along_axis(probs, order, axis=-1)
        keep = (mx.cumsum(sorted_p, axis=-1) - sorted_p) < top_p  # always keeps the most likely token
        sorted_p = mx.where(keep, sorted_p, 0.0)
        probs = mx.put_along_axis(mx.zeros_like(probs), order, sorted_p, axis=-1)
    return mx.random.categorical(mx.log(probs), axis=-1, key=key)


def generate_batch(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                   top_p: float, key: mx.array, eos_id: int) -> list[list[int]]:
    n, width = len(prompts), max(len(p) for p in prompts)
    padding = [width - len(p) for p in prompts]
    ids = mx.array([[eos_id] * pad + list(p) for pad, p in zip(padding, prompts)], dtype=mx.int32)
    cache = [BatchKVCache(padding) for _ in model.layers]
    done = mx.zeros((n,), dtype=mx.bool_)
    out: list[mx.array] = []
    step_ids = ids
    for _ in range(max_new_tokens):
        logits = model(step_ids, cache=cache)[:, -1].astype(mx.float32)
        key, sub = mx.random.split(key)
        nxt = sample_next(logits, temperature, top_p, sub)
        nxt = mx.where(done, mx.array(eos_id, dtype=mx.int32), nxt.astype(mx.int32))
        done = done | (nxt == eos_id)
        out.append(nxt)
        mx.eval(nxt, done)
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
    rows = mx.stack(out, axis=1).tolist() if out else [[] for _ in prompts]
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]
