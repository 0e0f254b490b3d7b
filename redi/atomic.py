"""Atomic run files, and the named kill points that prove it.

Every run file that is rewritten (config.yaml, metrics.jsonl, data_report.json, summary.json, settings.json,
reports) goes through ``write_text_atomic``: a temporary file beside the target, fsynced, moved over the target
with ``os.replace``, then the folder fsynced. A kill at any instant leaves either the old file or the new one,
never an empty or cut one.

Crash safety is tested by killing at named points, not by racing a timer: ``kill_point(name)`` sends SIGKILL
to this process when ``REDI_KILL_AT`` names that point (``name`` or ``name@N`` for its N-th call, 1-based).
Without the variable it costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_ENV = "REDI_KILL_AT"
_calls: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process here if ``REDI_KILL_AT`` names this point (fault injection for the resume tests)."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    target, _, nth = wanted.partition("@")
    if target != name:
        return
    _calls[name] = _calls.get(name, 0) + 1
    if _calls[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: str | Path) -> None:
    """A folder's entries (a rename into it, a new file) made durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str, *, point: str | None = None) -> Path:
    """Replace ``path`` with ``text`` in one rename. ``point`` names the kill point between the temporary
    file's write and the rename (the instant an in-place write would have left a cut file)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if point:
        kill_point(point)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path
