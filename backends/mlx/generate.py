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
from mlx_lm.models.cache import BatchKVCache, KVCache

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


def _candidate_nucleus(scaled: mx.array, top_p: float) -> tuple[mx.array, mx.array, mx.array]:
    """``_nucleus`` from the ``NUCLEUS_CANDIDATES`` most likely tokens, lazily, with per row whether it is exact
    (the candidates hold ``top_p``)."""
    vocab = scaled.shape[-1]
    top = mx.argpartition(scaled, vocab - NUCLEUS_CANDIDATES, axis=-1)[:, vocab - NUCLEUS_CANDIDATES:]
    ids, p = _most_likely_first(scaled, mx.logsumexp(scaled, axis=-1, keepdims=True), top)
    cumulative = mx.cumsum(p, axis=-1)
    return ids, mx.where(cumulative - p < top_p, p, 0.0), cumulative[:, -1] >= top_p


def _full_nucleus(scaled: mx.array, top_p: float) -> tuple[mx.array, mx.array]:
    ids, p = _most_likely_first(scaled, mx.logsumexp(scaled, axis=-1, keepdims=True))
    return ids, mx.where(mx.cumsum(p, axis=-1) - p < top_p, p, 0.0)


def _nucleus(scaled: mx.array, top_p: float) -> tuple[mx.array, mx.array]:
    """Token ids and probabilities (``softmax(scaled)``), most likely first, of the tokens nucleus sampling may
    draw; the others are left at probability 0. A token stays when the tokens more likely than it hold less
    than ``top_p``, so the most likely one always does.

    Sorting the vocabulary was most of a decode step on a CPU. The nucleus lies in the ``NUCLEUS_CANDIDATES``
    most likely tokens (a partition, linear in the vocabulary) whenever they hold ``top_p`` (every token
    after them then has at least ``top_p`` before it), so only those are sorted; the whole vocabulary is
    sorted only when some row's candidates hold less (a flat distribution). Both give the same nucleus."""
    if _uses_candidates(scaled, top_p):
        ids, p, exact = _candidate_nucleus(scaled, top_p)
        if mx.all(exact).item():
            return ids, p
    return _full_nucleus(scaled, top_p)


def _uses_candidates(scaled: mx.array, top_p: float) -> bool:
    return top_p < 1.0 and NUCLEUS_CANDIDATES < scaled.shape[-1]


def _draw(ids: mx.array, p: mx.array, key: mx.array) -> mx.array:
    choice = mx.random.categorical(mx.log(p), axis=-1, key=key)
    return mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(mx.int32)


def sample_next(logits: mx.array, temperature: float, top_p: float, key: mx.array) -> mx.array:
    if temperature <= 0:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    if top_p >= 1.0:
        return mx.random.categorical(logits / temperature, axis=-1, key=key).astype(mx.int32)
    return _draw(*_nucleus(logits / temperature, top_p), key)


class _Draw:
    """Tokens drawn for the running rows, not yet read. A decode step draws from the nucleus candidates without
    waiting for the check that they hold ``top_p`` (``lazy_step``), so the next step can be queued first.
    ``exact`` reads the check; ``redrawn`` draws the step again from the whole vocabulary with the same key and
    the same rows, then keeps the rows kept since: the tokens ``sample_next`` would have drawn at that step."""

    def __init__(self, tokens: mx.array, check: tuple | None = None):
        # check: (scaled logits, exact per row, key, top_p, rows kept since or None), for the first rows
        self.tokens, self.check = tokens, check

    @classmethod
    def lazy_step(cls, logits: mx.array, temperature: float, top_p: float, key: mx.array) -> "_Draw":
        if temperature <= 0 or not _uses_candidates(logits, top_p):
            return cls(sample_next(logits, temperature, top_p, key))
        scaled = logits / temperature
        ids, p, exact = _candidate_nucleus(scaled, top_p)
        return cls(_draw(ids, p, key), (scaled, exact, key, top_p, None))

    def arrays(self) -> list[mx.array]:
        return [self.tokens] + ([self.check[1]] if self.check else [])

    def exact(self) -> bool:
        return self.check is None or bool(mx.all(self.check[1]).item())

    def redrawn(self) -> "_Draw":
        scaled, _, key, top_p, kept = self.check
        head = _draw(*_full_nucleus(scaled, top_p), key)
        if kept is not None:
            head = head[kept]
        return _Draw(mx.concatenate([head, self.tokens[head.shape[0]:]]))

    def joined(self, tokens: mx.array) -> "_Draw":
        """These rows, then newly admitted rows (their tokens drawn by ``sample_next``)."""
        return _Draw(mx.concatenate([self.tokens, tokens]), self.check)

    def rows(self, index: mx.array) -> "_Draw":
        """The rows at ``index`` of a decode step's draw."""
        if self.check is None:
            return _Draw(self.tokens[index])
        return _Draw(self.tokens[index], self.check[:4] + (index,))


def _prefill(model: nn.Module, prompts: list[list[int]], share: bool = True) -> list[BatchKVCache]:
    """A left-padded cache, one row per prompt, holding each prompt but its last token (the first decode step
    feeds that one, so no prompt position's logits are ever computed). Each distinct prompt is prefilled alone,
    as mlx-lm does (a causal mask and no padding), and evaluated before the next, so memory holds one prompt's
    activations. With ``share``, equal prompts (the n samples of one prompt) are prefilled once and their row
    gathered (``filter`` with repeated indices): each row owns its copy, and decodes on its own."""
    if share:
        distinct: dict[tuple[int, ...], int] = {}
        rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        unique = [list(p) for p in distinct]
    else:
        rows, unique = list(range(len(prompts))), prompts
    per_prompt = []
    for p in unique:
        cache = [KVCache() for _ in model.layers]
        if len(p) > 1:
            model(mx.array(p[:-1], dtype=mx.int32)[None], cache=cache)  # the logits are never evaluated
            mx.eval([(layer.keys, layer.values) for layer in cache])
        per_prompt.append(cache)
    batch = [BatchKVCache.merge([cache[i] for cache in per_prompt]) for i in range(len(model.layers))]
    if len(unique) < len(prompts):
        index = mx.array(rows, dtype=mx.int32)
        for layer in batch:
            layer.filter(index)
    return batch


def _admit(model: nn.Module, prompts: list[list[int]], cache: list[BatchKVCache] | None,
           share: bool) -> list[BatchKVCache]:
    """Prefill newly admitted prompts and join them to the running rows' cache."""
    new_cache = _prefill(model, prompts, share)
    if cache is None:
        return new_cache
    for running, joining in zip(cache, new_cache):
        running.extend(joining)
    return cache


def _decode(model: nn.Module, cache: list[BatchKVCache], tokens: mx.array, temperature: float, top_p: float,
            key: mx.array) -> _Draw:
    """Queue the decode step that feeds ``tokens``: its draw is computed while the caller reads ``tokens``."""
    draw = _Draw.lazy_step(model(tokens[:, None], cache=cache)[:, -1].astype(mx.float32), temperature, top_p, key)
    mx.async_eval(*draw.arrays())
    return draw


def generate_batch(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                   top_p: float, key: mx.array, eos_id: int, stop_ids: Sequence[int] = (),
                   batch_size: int = 64, share_prefill: bool = True) -> list[list[int]]:
    """Continuous batching, as mlx-lm's BatchGenerator does it: a finished row is dropped from the cache
    (``BatchKVCache.filter``) and waiting prompts are prefilled and joined to it (``extend``). Equal prompts
    admitted together share one prefill (``_prefill``); ``share_prefill=False`` prefills every row, for tests.

    Each turn of the loop decodes one token for every row: a newly admitted row feeds its prompt's last token,
    a running row the token it drew. The next decode step is queued (``mx.async_eval``) before the drawn
    tokens are read, so building its graph overlaps the arithmetic; a row that stopped meanwhile decoded one
    token too many, which is dropped with the row. When a step's nucleus candidates turn out short, that
    step's write to the cache is undone (``trim``) and the step redrawn."""
    stops = {eos_id, *stop_ids}
    queue, ids, tokens = deque(range(len(prompts))), [], []
    outputs: list[list[int]] = [[] for _ in prompts]
    cache: list[BatchKVCache] | None = None
    drawn: _Draw | None = None  # what each row feeds next: drawn tokens not yet read, then admitted prompts' last
    while queue or ids:
        running = len(ids)  # rows below this feed a drawn token, the others their prompt's last token
        if queue and running < batch_size:
            admit = [queue.popleft() for _ in range(min(batch_size - running, len(queue)))]
            cache = _admit(model, [prompts[i] for i in admit], cache, share_prefill)
            last = mx.array([prompts[i][-1] for i in admit], dtype=mx.int32)
            drawn = drawn.joined(last) if drawn is not None else _Draw(last)
            ids, tokens = ids + admit, tokens + [[] for _ in admit]
        key, sub = mx.random.split(key)
        ahead = _decode(model, cache, drawn.tokens, temperature, top_p, sub)
        if not drawn.exact():
            for layer in cache:
                layer.trim(1)
            drawn = drawn.redrawn()
            ahead = _decode(model, cache, drawn.tokens, temperature, top_p, sub)
        fed = drawn.tokens.tolist()[:running]
        keep = record_drawn(fed, ids[:running], tokens[:running], 0, stops, max_new_tokens, outputs)
        keep += range(running, len(ids))
        drawn = ahead
        if len(keep) < len(ids):
            ids, tokens = [ids[r] for r in keep], [tokens[r] for r in keep]
            if keep:
                index = mx.array(keep, dtype=mx.int32)
                for layer in cache:
                    layer.filter(index)
                drawn = drawn.rows(index)
            else:  # filter() cannot shrink a cache to no rows; the next admission starts a new one
                cache, drawn = None, None
    return outputs
