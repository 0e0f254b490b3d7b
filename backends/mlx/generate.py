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


# Nucleus sampling sorts only this many of the most likely tokens when they hold top_p of the mass (see _nucleus).
NUCLEUS_CANDIDATES = 1024


def _most_likely_first(scaled: mx.array, log_total: mx.array,
                       candidates: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """The candidate token ids (default: the whole vocabulary), most likely first, and their probabilities."""
    if candidates is None:
        ids = mx.argsort(-scaled, axis=-1)
    else:
        order = mx.argsort(-mx.take_along_axis(scaled, candidates, axis=-1), axis=-1)
        ids = mx.take_along_axis(candidates, order, axis=-1)
    return ids, mx.exp(mx.take_along_axis(scaled, ids, axis=-1) - log_total)


def _nucleus(scaled: mx.array, top_p: float) -> tuple[mx.array, mx.array]:
    """Token ids and probabilities (``softmax(scaled)``), most likely first, of the tokens nucleus sampling may
    draw; the others are left at probability 0. A token stays when the tokens more likely than it hold less
    than ``top_p``, so the most likely one always does.

    Sorting the vocabulary was most of a decode step on a CPU. The nucleus lies in the ``NUCLEUS_CANDIDATES``
    most likely tokens (a partition, linear in the vocabulary) whenever they hold ``top_p`` (every token
    after them then has at least ``top_p`` before it), so only those are sorted; the whole vocabulary is
    sorted only when some row's candidates hold less (a flat distribution). Both give the same nucleus."""
    vocab = scaled.shape[-1]
    log_total = mx.logsumexp(scaled, axis=-1, keepdims=True)
    if NUCLEUS_CANDIDATES < vocab:
        top = mx.argpartition(scaled, vocab - NUCLEUS_CANDIDATES, axis=-1)[:, vocab - NUCLEUS_CANDIDATES:]
        ids, p = _most_likely_first(scaled, log_total, top)
        cumulative = mx.cumsum(p, axis=-1)
        if mx.all(cumulative[:, -1] >= top_p).item():
            return ids, mx.where(cumulative - p < top_p, p, 0.0)
    ids, p = _most_likely_first(scaled, log_total)
    return ids, mx.where(mx.cumsum(p, axis=-1) - p < top_p, p, 0.0)


def sample_next(logits: mx.array, temperature: float, top_p: float, key: mx.array) -> mx.array:
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    if top_p >= 1.0:
        return mx.random.categorical(logits / temperature, axis=-1, key=key)
    ids, p = _nucleus(logits / temperature, top_p)
    choice = mx.random.categorical(mx.log(p), axis=-1, key=key)
    return mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]


def _prefill(model: nn.Module, prompts: list[list[int]], pad_id: int,
             share: bool = True) -> tuple[mx.array, list[BatchKVCache]]:
    """Last-position logits and a left-padded cache for ``prompts``. With ``share``, equal prompts (the n samples
    of one prompt) are prefilled once and their cache rows gathered to one row per prompt: each row then owns
    its copy, and the logits, the rows' order and hence the samples are those of a prefill of every row."""
    distinct: dict[tuple[int, ...], int] = {}
    rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts] if share else list(range(len(prompts)))
    unique = [list(p) for p in distinct] if share else prompts
    width = max(len(p) for p in unique)
    padding = [width - len(p) for p in unique]
    ids = mx.array([[pad_id] * pad + list(p) for pad, p in zip(padding, unique)], dtype=mx.int32)
    cache = [BatchKVCache(padding) for _ in model.layers]
    logits = model(ids, cache=cache)[:, -1].astype(mx.float32)
    if len(unique) < len(prompts):
        index = mx.array(rows, dtype=mx.int32)
        for layer in cache:
            layer.filter(index)  # a gather: repeated indices copy a row
        logits = logits[index]
    return logits, cache


def generate_batch(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                   top_p: float, key: mx.array, eos_id: int, stop_ids: Sequence[int] = (),
                   batch_size: int = 64, share_prefill: bool = True) -> list[list[int]]:
    """Continuous batching, as mlx-lm's BatchGenerator does it: a finished row is dropped from the cache
    (``BatchKVCache.filter``) and waiting prompts are prefilled and joined to it (``extend``). Equal prompts
    admitted together share one prefill (``_prefill``); ``share_prefill=False`` prefills every row, for tests."""
    stops = {eos_id, *stop_ids}
    queue, ids, tokens = deque(range(len(prompts))), [], []
    outputs: list[list[int]] = [[] for _ in prompts]
    cache: list[BatchKVCache] | None = None
    last = mx.zeros((0,), dtype=mx.int32)
    while queue or ids:
        key, sub = mx.random.split(key)
        if queue and len(ids) < batch_size:
            admit = [queue.popleft() for _ in range(min(batch_size - len(ids), len(queue)))]
            logits, new_cache = _prefill(model, [prompts[i] for i in admit], eos_id, share_prefill)
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
