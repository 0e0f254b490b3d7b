"""Run guards: the collapse alarm the paper's figures describe, and the non-finite step budget.

Collapse (paper Figs. 3, 5, 6): the chosen and the rejected per-token log-probs (LogPS) fall *together*
while the size of the parameter update rises. A steady, slow fall of both with a flat update size is the
benign REDI regime (Fig. 7), so the alarm needs all three signals over a window, or a fall so steep that it
is a collapse whatever the update does.

The update is measured per unit of learning rate (update_norm / lr, i.e. the size of Adam's normalised
step): the linear decay shrinks update_norm itself during a collapse, which hid it on the demo. Calibrated
on the demo's SFT checkpoint, 100 stage-2 steps each: symmetric at lr 3e-5 (LogPS -0.10 -> -1.46, update/lr
300 -> 470) fires; symmetric at 1e-4 (LogPS -0.10 -> -3.1 within 20 steps) fires through the steep-fall rule;
REDI alpha 0.8 at 1e-5 (LogPS -0.10 -> -0.12, update/lr flat near 300) does not.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CollapseDetector:
    window: int = 20  # steps compared: the first half of the window against the second half
    drop: float = 0.1  # nats/token both LogPS must fall by, between the two half-window means
    growth: float = 1.15  # factor the mean update per unit lr must grow by, between the two halves
    severe_drop: float = 1.0  # a fall of both LogPS this steep is a collapse on its own
    ignore_before: int = 0  # steps to skip (warmup makes update_norm rise for benign reasons)
    _hist: deque = field(default_factory=deque, repr=False)

    def update(self, record: dict) -> bool:
        """Feed one step's metrics; True when this step's window shows a collapse."""
        if record.get("step", 0) <= self.ignore_before or "logps/rejected_normalized" not in record:
            return False
        update = record["update_norm"]
        if update is not None and record.get("lr"):
            update = update / record["lr"]
        values = (record["logps/chosen_normalized"], record["logps/rejected_normalized"], update)
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
        severe = late[0] < early[0] - self.severe_drop and late[1] < early[1] - self.severe_drop
        return bool(chosen_fell and rejected_fell and (update_rose or severe))


@dataclass
class NonFiniteBudget:
    allowed: int = 0
    seen: list[int] = field(default_factory=list)

    def tolerate(self, step: int) -> bool:
        self.seen.append(step)
        return len(self.seen) <= self.allowed
