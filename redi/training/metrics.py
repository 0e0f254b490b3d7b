"""Per-step metrics with TRL's key names plus the paper's diagnostics, and the metrics.jsonl writer."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from redi.atomic import kill_point, write_text_atomic
from redi.errors import UserError
from redi.objectives import NumpyOps, Objective, PairStats, sft_loss


def pair_step_metrics(objective: Objective, stats: PairStats) -> dict[str, float]:
    """Metrics of one optimizer step from the statistics of all its pairs."""
    loss, r_chosen, r_rejected = objective(NumpyOps, stats)
    chosen_norm = stats.chosen_logps / stats.chosen_lengths
    rejected_norm = stats.rejected_logps / stats.rejected_lengths
    return {
        "loss": float(loss),
        "logps/chosen": float(np.mean(stats.chosen_logps)),
        "logps/rejected": float(np.mean(stats.rejected_logps)),
        "logps/chosen_normalized": float(np.mean(chosen_norm)),
        "logps/rejected_normalized": float(np.mean(rejected_norm)),
        "rewards/chosen": float(np.mean(r_chosen)),
        "rewards/rejected": float(np.mean(r_rejected)),
        "rewards/accuracies": float(np.mean(r_chosen > r_rejected)),
        "rewards/margins": float(np.mean(r_chosen - r_rejected)),
        "lengths/chosen": float(np.mean(stats.chosen_lengths)),
        "lengths/rejected": float(np.mean(stats.rejected_lengths)),
    }


def sft_step_metrics(logps: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    loss = float(sft_loss(NumpyOps, logps, lengths))
    return {
        "loss": loss,
        "logps/chosen": float(np.mean(logps)),
        "logps/chosen_normalized": -loss,
        "lengths/chosen": float(np.mean(lengths)),
    }


class MetricsWriter:
    """Appends one JSON object per optimizer step; flushed every line so a kill loses nothing written."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.fh.write(json.dumps(clean) + "\n")
        self.fh.flush()
        kill_point("metrics-append")  # between steps: the resume tests' "killed mid-stage"

    def close(self) -> None:
        self.fh.close()


def read_metrics(path: Path) -> list[dict]:
    """Every record; a half-written last line (a kill mid-append, cut off on resume) is left out."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise UserError(f"{path} line {number}: not a JSON record; the run folder was changed by hand or "
                            f"damaged") from None
    return records


def truncate_metrics(path: Path, last_global_step: int) -> None:
    """Keep only records up to ``last_global_step`` (resume rewinds to the checkpoint's step)."""
    kept = [r for r in read_metrics(path) if r.get("global_step", 0) <= last_global_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept), point="metrics-rewind")
