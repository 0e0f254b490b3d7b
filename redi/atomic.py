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
import re
import shutil
import signal
import sys
from pathlib import Path

KILL_ENV = "REDI_KILL_AT"
_calls: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process here if ``REDI_KILL_AT`` names this point (fault injection for the resume tests):
    ``point``, ``point@N`` (its Nth pass), or ``point@N:SIGINT`` (another signal: Ctrl-C at a known step)."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    target, _, rest = wanted.partition("@")
    if target != name:
        return
    nth, _, sig = rest.partition(":")
    _calls[name] = _calls.get(name, 0) + 1
    if _calls[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, sig) if sig else signal.SIGKILL)


def fsync_dir(path: str | Path) -> None:
    """A folder's entries (a rename into it, a new file) made durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """Where a file or folder is built before its rename (``kind`` "tmp"), or where the folder it replaces
    waits for deletion ("old"): hidden, beside the target, named by the process; ``remove_stale`` knows it."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


# temporary_name's names, and the checkpoint folders' names before it (".tmp-step-8-PID", ".old-final-PID")
_STALE = re.compile(r"\..+\.(tmp|old)-\d+|\.(tmp|old)-.+-\d+")


def remove_stale(folder: str | Path) -> list[Path]:
    """Delete what a killed process left of its atomic writes in ``folder`` (temporaries never renamed, a
    replaced folder not yet deleted). Only for a folder no other process is writing."""
    folder = Path(folder)
    stale = sorted(p for p in folder.iterdir() if _STALE.fullmatch(p.name)) if folder.is_dir() else []
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def drop_partial_last_line(path: str | Path) -> int:
    """Cut a jsonl file back to its last complete line; the bytes dropped (0 when it ends with a newline).
    Each record is written as one line and its newline, so a line without one is a write a kill interrupted."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb") as fh:  # read backwards from the end: the file may be large, the cut line is short
        size = pos = fh.seek(0, os.SEEK_END)
        keep = 0
        while pos > 0:
            pos -= min(1 << 16, pos)
            fh.seek(pos)
            newline = fh.read(min(1 << 16, size - pos)).rfind(b"\n")
            if newline >= 0:
                keep = pos + newline + 1
                break
    if keep < size:
        os.truncate(path, keep)
    return size - keep


def recover_jsonl(path: str | Path) -> None:
    """Before appending to a jsonl file a killed process wrote: drop its half-written last line, and say so."""
    cut = drop_partial_last_line(path)
    if cut:
        print(f"warning: {path}: dropped a half-written last line ({cut} bytes; the writer was killed mid-line)",
              file=sys.stderr)


def write_text_atomic(path: str | Path, text: str, *, point: str | None = None) -> Path:
    """Replace ``path`` with ``text`` in one rename. ``point`` names the kill point between the temporary
    file's write and the rename (the instant an in-place write would have left a cut file)."""
    path = Path(path)
    tmp = temporary_name(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if point:
        kill_point(point)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path
