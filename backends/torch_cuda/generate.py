"""Sampling with continuous batching: a finished row frees its slot for the next prompt at once.

A plain loop over a KV cache, deterministic under our own ``torch.Generator`` (HF generate draws from the
global RNG). Rows are left-padded; a row's positions count from its first real token. Each iteration either
admits waiting prompts into free slots (one prefill of the newcomers, equal prompts once, whose cache is then
left-padded to the running rows' width and concatenated) or decodes one token for every running row. A row leaves as soon as it
samples a stop id or reaches ``max_new_tokens``, so one long straggler no longer holds a batch of short
answers: its slots keep working on the queue. Cache columns that no running row attends to any more (the
padding of rows that left) are dropped, so the cache is as wide as the longest live row, not the whole run.
Outputs are in prompt order and end with their stop id when they stopped.
"""
from __future__ import annotations

from collections import deque
from contextlib import AbstractContextManager
from typing import Callable

import torch

from redi.backend import record_drawn


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _left_padded(prompts: list[list[int]], pad_id: int, device,
                 share: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input ids, attention mask) of the prompts to prefill, left-padded, and with ``share`` the row of each
    prompt among them (None when every prompt is prefilled): equal prompts are prefilled once."""
    copies = None
    if share:
        distinct: dict[tuple[int, ...], int] = {}
        index = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        if len(distinct) < len(prompts):
            prompts = [list(p) for p in distinct]
            copies = torch.tensor(index, dtype=torch.long, device=device)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, device=device)
        attn[r, width - len(p):] = 1
    return ids, attn, copies


class _Rows:
    """The running rows: their request ids, tokens so far, attention mask and per-layer (keys, values)."""

    def __init__(self, device):
        self.ids: list[int] = []
        self.tokens: list[list[int]] = []
        self.attn = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, ids: list[int], attn: torch.Tensor, kv: list) -> None:
        width = max(self.attn.shape[1], attn.shape[1])
        if self.kv:
            kv = [(torch.cat([_left_pad(k0, width, 2), _left_pad(k1, width, 2)]),
                   torch.cat([_left_pad(v0, width, 2), _left_pad(v1, width, 2)]))
                  for (k0, v0), (k1, v1) in zip(self.kv, kv)]
        self.kv = kv
        self.attn = torch.cat([_left_pad(self.attn, width, 1), _left_pad(attn, width, 1)])
        self.ids += ids
        self.tokens += [[] for _ in ids]

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.attn.device)
        self.ids = [self.ids[r] for r in rows]
        self.tokens = [self.tokens[r] for r in rows]
        self.attn = self.attn[index]
        live = torch.nonzero(self.attn.any(0))
        first = int(live[0]) if len(live) else self.attn.shape[1]  # columns before it are padding for every row
        self.attn = self.attn[:, first:]
        self.kv = [(k[index][:, :, first:], v[index][:, :, first:]) for k, v in self.kv]


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
             gen: torch.Generator, stop_ids: set[int], pad_id: int, batch_size: int, device,
             autocast: Callable[[], AbstractContextManager], cache_kwarg: str,
             share_prefill: bool = True) -> list[list[int]]:
    """Equal prompts admitted together (the n samples of one prompt) are prefilled once (``_left_padded``) and
    their rows copied before the first draw, so the rows, their order and the draws are those of a prefill of
    every row; ``share_prefill=False`` prefills every row, for tests."""
    from transformers import DynamicCache

    queue, rows = deque(range(len(prompts))), _Rows(device)
    outputs: list[list[int]] = [[] for _ in prompts]
    last = torch.zeros(0, dtype=torch.long, device=device)
    while queue or rows.ids:
        if queue and len(rows.ids) < batch_size:
            admit = [queue.popleft() for _ in range(min(batch_size - len(rows.ids), len(queue)))]
            ids, attn, copies = _left_padded([prompts[i] for i in admit], pad_id, device, share_prefill)
            cache, step_ids, feed = DynamicCache(), ids, None
        else:
            rows.attn = torch.cat([rows.attn, torch.ones_like(rows.attn[:, :1])], dim=1)
            cache, step_ids, attn = DynamicCache(rows.kv), last[:, None], rows.attn
            feed = True
        position = (attn.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        with autocast():
            logits = model(input_ids=step_ids, attention_mask=attn, position_ids=position, use_cache=True,
                           **{cache_kwarg: cache}).logits[:, -1].float()
        if not feed:
            kv = _layers(cache)
            if copies is not None:  # one row per admitted prompt again, before anything is drawn
                logits, attn, kv = logits[copies], attn[copies], [(k[copies], v[copies]) for k, v in kv]
        nxt = sample_next(logits, temperature, top_p, gen)
        if feed:
            rows.kv = _layers(cache)
            last, fresh = nxt, 0
        else:
            # Running rows keep their pending token (appended when it was drawn); only newcomers drew one now.
            fresh = len(rows.ids)
            rows.add(admit, attn, kv)
            last = torch.cat([last, nxt])
        keep = record_drawn(last.tolist(), rows.ids, rows.tokens, fresh, stop_ids, max_new_tokens, outputs)
        if len(keep) < len(rows.ids):
            rows.keep(keep)
            last = last[torch.tensor(keep, dtype=torch.long, device=device)]
    return outputs
