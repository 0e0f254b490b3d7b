"""Which examples go into which optimizer step and micro-batch, decided by the core for every backend.

The order is a pure function of (seed, step), so a resumed run sees exactly the batches an uninterrupted
run would, and torch and MLX see the same ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from redi.backend import MicroBatch
from redi.data import TokenizedPair, TokenizedSeq


def lr_at(step: int, total_steps: int, peak: float, warmup_ratio: float) -> float:
    """HF's ``get_linear_schedule_with_warmup`` exactly, as the authors' Trainer used it: warmup over
    ceil(ratio * total) steps starting from 0 (so the very first update has lr 0), then linear decay to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak * step / warmup
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def token_groups(lengths: Sequence[int], budget: int, max_items: int = 0, padded: bool = False) -> list[list[int]]:
    """Greedy groups of consecutive items whose summed length stays within ``budget`` (0: no budget) and whose
    count stays within ``max_items`` (0: no cap); an item longer than the budget gets a group of its own.
    ``padded``: a group costs its count times its longest item (right-padded rows). The micro-batches of a step
    (tokens, rows) and the optimizer's update-norm buckets (elements) use it."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = longest = 0
    for k, n in enumerate(lengths):
        cost = (len(current) + 1) * max(longest, n) if padded else used + n
        if current and ((budget and cost > budget) or (max_items and len(current) >= max_items)):
            groups.append(current)
            current, used, longest = [], 0, 0
        current.append(k)
        used, longest = used + n, max(longest, n)
    if current:
        groups.append(current)
    return groups


def example_tokens(example: TokenizedSeq | TokenizedPair, padded: bool = False) -> int:
    """Tokens an example adds to a micro-batch: both sequences of a pair; ``padded``: as many as its longest."""
    if isinstance(example, TokenizedPair):
        if padded:
            return 2 * max(example.chosen.length, example.rejected.length)
        return example.chosen.length + example.rejected.length
    return example.length


@dataclass
class StepPlan:
    n_examples: int
    batch_size: int
    micro_batch_size: int  # rows (sequences or pairs) per micro-batch at most; 0: no cap
    epochs: float
    max_steps: int
    seed: int
    micro_batch_tokens: int = 0  # tokens per micro-batch at most (a longer row goes alone); 0: no budget
    padded: bool = False  # the backend right-pads micro-batches: the budget counts the padding too

    @property
    def steps_per_epoch(self) -> int:
        # Incomplete final batches are dropped, as in the authors' runs (53,175 pairs / 32 -> 1,661 steps).
        return max(1, self.n_examples // self.batch_size)

    @property
    def total_steps(self) -> int:
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)

    def step_indices(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        per_step = min(self.batch_size, self.n_examples)
        return order[offset * per_step:(offset + 1) * per_step]

    def micro_batches(self, step: int, examples: Sequence[TokenizedSeq | TokenizedPair]) -> list[MicroBatch]:
        idx = self.step_indices(step)
        # Length-sorting inside a step cuts padding and changes nothing in the loss: each micro-batch is
        # weighted by its share of the step's denominator, so any grouping gives the step's exact gradient.
        idx = idx[np.argsort([examples[i].length for i in idx], kind="stable")]
        sizes = [example_tokens(examples[i], self.padded) for i in idx]
        groups = [idx[g] for g in token_groups(sizes, self.micro_batch_tokens, self.micro_batch_size, self.padded)]
        pairs = isinstance(examples[0], TokenizedPair)
        if pairs:
            return [
                MicroBatch(
                    [examples[i].chosen for i in g] + [examples[i].rejected for i in g],
                    n_pairs=len(g), weight=len(g) / len(idx), indices=g,
                )
                for g in groups
            ]
        total_tokens = sum(len(examples[i].completion) for i in idx)
        return [
            MicroBatch([examples[i] for i in g], 0, sum(len(examples[i].completion) for i in g) / total_tokens, g)
            for g in groups
        ]
