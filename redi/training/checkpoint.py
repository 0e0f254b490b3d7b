"""Atomic checkpoints: write into a temporary folder, fsync, then rename. A kill mid-save leaves the
previous checkpoint intact and never a half-written folder that resume would pick."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from redi.atomic import fsync_dir as _fsync_dir

STATE_FILE = "trainer_state.json"


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` and move ``tmp`` to ``target`` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    if os.environ.get("REDI_FAULT_CHECKPOINT_DELAY"):
        # Fault-injection hook for the resume tests: widen the window in which a kill finds a half-made folder.
        import time

        time.sleep(float(os.environ["REDI_FAULT_CHECKPOINT_DELAY"]))
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    _fsync_dir(target.parent)
    return target


def write_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def prune(run_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
