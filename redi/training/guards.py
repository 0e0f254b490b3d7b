"""Run guards: the collapse alarm the paper's figures describe, and the non-finite step budget.

Collapse (paper Figs. 3, 5, 6) is a sustained fall of *both* per-token log-probs (LogPS), chosen and
rejected. The rule, in one sentence: **the alarm fires when both LogPS, averaged over the last
``window`` steps, sit at least ``drop`` nats/token below their average over the first ``window`` steps
after warmup, and at least ``ratio`` times as far below zero.** The absolute floor keeps a near-perfect start
(-0.01 -> -0.02) quiet; the ratio keeps the benign REDI regime (Fig. 7: a slow fall of a few tenths from an
already low start) quiet. The update norm is not part of the rule: on a replayed collapse it fell while the
LogPS fell (the LR decay and Adam's normalisation hide it), so it cannot be a required signal.

Replays (tests/fixtures/collapse_*): the demo's symmetric REDI at lr 3e-5 (LogPS -0.10 -> -1.4) and 1e-4
(-> -3) and the default `redi compare` grid's symmetric-high arm (-0.10 -> -0.62, peak accuracy at step 25,
8.8% at the end) fire at steps 41, 25 and 41 of 100; REDI alpha 0.8 and symmetric-low stay silent (their
largest fall is 1.4x and 0.04 nats/token). The decision is the same for windows of 5-20 steps, ratios of
1.5-2 and floors of 0.05-0.2 nats/token, so the defaults are not tuned to these runs.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CollapseDetector:
    window: int = 10  # steps averaged at the start (after warmup) and at the current step
    drop: float = 0.1  # nats/token both LogPS must have fallen by
    ratio: float = 2.0  # ... and how many times as far below zero as at the start they must be
    ignore_before: int = 0  # warmup steps; the start average begins after them
    _start: list = field(default_factory=list, repr=False)
    _recent: deque = field(default_factory=deque, repr=False)

    @classmethod
    def from_config(cls, cfg, ignore_before: int = 0) -> "CollapseDetector":
        return cls(cfg.collapse_window, cfg.collapse_drop, cfg.collapse_ratio, ignore_before=ignore_before)

    def update(self, record: dict) -> bool:
        """Feed one step's metrics; True when this step's window shows a collapse."""
        if record.get("step", 0) <= self.ignore_before or "logps/rejected_normalized" not in record:
            return False
        values = (record["logps/chosen_normalized"], record["logps/rejected_normalized"])
        if any(v is None or not np.isfinite(v) for v in values):
            return False
        if len(self._start) < self.window:
            self._start.append(values)
        self._recent.append(values)
        while len(self._recent) > self.window:
            self._recent.popleft()
        if len(self._recent) < self.window or len(self._start) < self.window:
            return False
        start, now = np.mean(self._start, axis=0), np.mean(self._recent, axis=0)
        fell = (now < start - self.drop) & (now < self.ratio * np.minimum(start, 0.0))
        return bool(fell.all())


@dataclass
class NonFiniteBudget:
    allowed: int = 0
    seen: list[int] = field(default_factory=list)

    def tolerate(self, step: int) -> bool:
        self.seen.append(step)
        return len(self.seen) <= self.allowed
