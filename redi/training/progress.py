"""Progress for people and for log files.

On a terminal: rich's live bar. Anywhere else (a log file, a cluster job, a pipe) rich draws nothing until
the end and cuts lines at 80 columns, so the log stayed empty for minutes. There we print plain, uncut lines
instead: at the first step, every ``every`` steps, at least every ``seconds``, and when a task finishes.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    info: str
    started: float = field(default_factory=time.monotonic)
    printed_at: float = field(default_factory=time.monotonic)
    updates: int = 0


class PlainProgress:
    """The slice of rich.progress.Progress the loop and the evaluation use, printing plain lines."""

    def __init__(self, every: int = 10, seconds: float = 30.0, stream: TextIO | None = None):
        self.every, self.seconds = max(1, every), seconds
        self.stream = stream
        self.tasks: list[_Task] = []

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        self.tasks.append(_Task(description, total, completed, str(fields.get("info", ""))))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, advance: float = 0, completed: float | None = None,
               total: float | None = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        task.completed = completed if completed is not None else task.completed + advance
        task.total = total if total is not None else task.total
        if "info" in fields:
            task.info = str(fields["info"])
        task.updates += 1
        now = time.monotonic()
        done = task.total is not None and task.completed >= task.total
        if task.updates == 1 or task.updates % self.every == 0 or done or now - task.printed_at >= self.seconds:
            task.printed_at = now
            self._print(task, now)

    def _print(self, task: _Task, now: float) -> None:
        elapsed = now - task.started
        where = f"{task.completed:g}" + (f"/{task.total:g}" if task.total else "")
        eta = ""
        if task.total and 0 < task.completed < task.total:
            eta = f", ~{elapsed / task.completed * (task.total - task.completed):.0f}s left"
        info = " ".join(task.info.replace("[bold red]", "").replace("[/]", "").split())
        print(f"{task.description}: {where}  {info}  [{elapsed:.0f}s{eta}]".rstrip(), file=self.stream or sys.stdout,
              flush=True)


def make_progress(every: int = 10):
    """rich's bar on a terminal, plain lines elsewhere."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not Console().is_terminal:
        return PlainProgress(every)
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False,
    )
