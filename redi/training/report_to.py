"""Where each step's metrics record goes: metrics.jsonl always, plus the trackers named in ``report_to``.

A sink is anything with ``write(record)`` and ``close()`` (``MetricsSink``). ``open_sinks`` builds the fan-out
for one run (the names, ``redi.config.REPORT_TARGETS``, are checked by ``config.validate``): the jsonl writer first, then TensorBoard (event files under ``<run>/tensorboard/``) and W&B (its
run files under ``<run>/wandb/``; ``WANDB_MODE=offline`` or ``disabled`` is honoured as W&B always does, and the
project and run name come from the config keys ``wandb_project`` and ``wandb_run_name``).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Protocol

from redi.errors import UserError


class MetricsSink(Protocol):
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


def _scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers (the trackers plot scalars; stage names and flags stay in metrics.jsonl)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _step(record: dict) -> int:
    return int(record.get("global_step", 0))


class TensorBoardSink:
    """Scalars as TensorBoard events, tagged ``<stage>/<key>`` (SFT and pair metrics share names), x = global step."""

    def __init__(self, logdir: Path):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self._writer = EventFileWriter(str(logdir), flush_secs=5)

    def write(self, record: dict) -> None:
        prefix = f"{record['stage']}/" if "stage" in record else ""
        values = [self._summary.Value(tag=prefix + k, simple_value=v) for k, v in _scalars(record).items()]
        self._writer.add_event(self._event(wall_time=time.time(), step=_step(record),
                                           summary=self._summary(value=values)))

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """One W&B run per training run; each record logged at its global step, keys as in metrics.jsonl."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict[str, Any]):
        import wandb

        self._run = wandb.init(project=project, name=name, dir=str(run_dir), config=config, reinit="create_new")

    def write(self, record: dict) -> None:
        data: dict[str, Any] = _scalars(record)
        if "stage" in record:
            data["stage"] = record["stage"]
        self._run.log(data, step=_step(record))

    def close(self) -> None:
        import wandb

        self._run.finish()
        # Stops W&B's service process, which writes the run files: without it a busy machine can end the
        # program before the records reach run-*.wandb (seen with WANDB_MODE=offline on 2 loaded cores).
        wandb.teardown()


class FanOut:
    """Every record to every sink; every sink closed even when one fails to close."""

    def __init__(self, sinks: list[MetricsSink]):
        self.sinks = sinks

    def write(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:  # noqa: BLE001 - close the rest, then report the first
                errors.append(err)
        if errors:
            raise errors[0]


def check_report_to(targets: list[str]) -> None:
    """The library of each target is installed (names are checked by config.validate); fails before training."""
    import importlib.util

    for target in targets:
        if importlib.util.find_spec(target) is None:
            raise UserError(f"report_to: {target} needs the {target} package: pip install 'redi[{target}]'")


def open_sinks(jsonl: MetricsSink, run_dir: Path, targets: list[str], *, project: str, name: str,
               config: dict[str, Any]) -> FanOut:
    """metrics.jsonl's writer plus one sink per ``report_to`` target."""
    check_report_to(targets)
    sinks: list[MetricsSink] = [jsonl]
    if "tensorboard" in targets:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if "wandb" in targets:
        sinks.append(WandbSink(run_dir, project, name or run_dir.name, config))
    return FanOut(sinks)
