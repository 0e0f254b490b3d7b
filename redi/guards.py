"""Run guards: the collapse alarm the paper's figures describe, and the non-finite step budget.

Collapse (paper Figs. 3, 5, 6): the chosen and the rejected per-token log-probs (LogPS) fall *together*
while the size of the parameter update rises. A steady, slow fall of both with a flat update size is the
benign REDI regime (Fig. 7), so the alarm needs all three signals over a window.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CollapseDetector:
    window: int = 10  # steps compared: the first half of the window against the second half
    drop: float = 0.05  # nats/token both LogPS must fall by, between the two half-window means
    growth: float = 1.5  # factor the mean update_norm must grow by, between the two halves
    ignore_before: int = 0  # steps to skip (warmup makes update_norm rise for benign reasons)
    _hist: deque = field(default_factory=deque, repr=False)

    def update(self, record: dict) -> bool:
        """Feed one step's metrics; True when this step's window shows a collapse."""
        if record.get("step", 0) <= self.ignore_before or "logps/rejected_normalized" not in record:
            return False
        values = (record["logps/chosen_normalized"], record["logps/rejected_normalized"], record["update_norm"])
        if any(v is None or not np.isfinite(v) for v in values):
            return False
        self._hist.append(values)
        while len(self._hist) > self.window:
            self._hist.popleft()
        if len(self._hist) < self.window:
            return False
        h = np.array(self._hist)
        half = self.window // 2
        early, late = h[:half].mean(axis=0), h[-half:].mean(axis=0)
        chosen_fell = late[0] < early[0] - self.drop
        rejected_fell = late[1] < early[1] - self.drop
        update_rose = late[2] > self.growth * max(early[2], 1e-30)
        return bool(chosen_fell and rejected_fell and update_rose)


@dataclass
class NonFiniteBudget:
    allowed: int = 0
    seen: list[int] = field(default_factory=list)

    def tolerate(self, step: int) -> bool:
        self.seen.append(step)
        return len(self.seen) <= self.allowed
