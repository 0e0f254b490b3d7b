"""Continuously batched sampling with mlx-lm's left-padded KV cache, with the torch backend's semantics.

Same contract as ``TorchBackend.generate``: left-padded prompts, positions counted from each prompt's first
real token (``BatchKVCache`` offsets do that), greedy at temperature 0, nucleus sampling that always keeps
the most likely token, a row that samples ``eos_id`` or a stop id leaves (its slot takes the next prompt),
and each output ends with the stop id that ended it.
Randomness comes from an explicit key split from ``seed``, so results do not depend on global RNG state
(they are not the torch backend's samples: the two RNGs differ).
"""
from __future__ import annotations

from collections import deque
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache

from redi.backend import record_drawn


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


def _prefill(model: nn.Module, prompts: list[list[int]], pad_id: int) -> tuple[mx.array, list[BatchKVCache]]:
    width = max(len(p) for p in prompts)
    padding = [width - len(p) for p in prompts]
    ids = mx.array([[pad_id] * pad + list(p) for pad, p in zip(padding, prompts)], dtype=mx.int32)
    cache = [BatchKVCache(padding) for _ in model.layers]
    return model(ids, cache=cache)[:, -1].astype(mx.float32), cache


def generate_batch(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                   top_p: float, key: mx.array, eos_id: int, stop_ids: Sequence[int] = (),
                   batch_size: int = 64) -> list[list[int]]:
    """Continuous batching, as mlx-lm's BatchGenerator does it: a finished row is dropped from the cache
    (``BatchKVCache.filter``) and waiting prompts are prefilled and joined to it (``extend``)."""
    stops = {eos_id, *stop_ids}
    queue, ids, tokens = deque(range(len(prompts))), [], []
    outputs: list[list[int]] = [[] for _ in prompts]
    cache: list[BatchKVCache] | None = None
    last = mx.zeros((0,), dtype=mx.int32)
    while queue or ids:
        key, sub = mx.random.split(key)
        if queue and len(ids) < batch_size:
            admit = [queue.popleft() for _ in range(min(batch_size - len(ids), len(queue)))]
            logits, new_cache = _prefill(model, [prompts[i] for i in admit], eos_id)
            if cache is None:
                cache = new_cache
            else:
                for running, joining in zip(cache, new_cache):
                    running.extend(joining)
            # Running rows keep their pending token (appended when it was drawn); only newcomers drew one now.
            fresh = len(ids)
            ids, tokens = ids + admit, tokens + [[] for _ in admit]
            last = mx.concatenate([last, sample_next(logits, temperature, top_p, sub).astype(mx.int32)])
        else:
            logits = model(last[:, None], cache=cache)[:, -1].astype(mx.float32)
            last = sample_next(logits, temperature, top_p, sub).astype(mx.int32)
            fresh = 0
        mx.eval(last)
        keep = record_drawn(last.tolist(), ids, tokens, fresh, stops, max_new_tokens, outputs)
        if len(keep) < len(ids):
            ids, tokens = [ids[r] for r in keep], [tokens[r] for r in keep]
            if keep:
                index = mx.array(keep, dtype=mx.int32)
                for layer in cache:
                    layer.filter(index)
                last = last[index]
            else:  # filter() cannot shrink a cache to no rows; the next admission starts a new one
                cache, last = None, mx.zeros((0,), dtype=mx.int32)
    return outputs
