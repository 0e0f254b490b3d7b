"""Atomic checkpoints: write into a temporary folder, fsync, then rename. A kill mid-save leaves the
previous checkpoint intact and never a half-written folder that resume would pick."""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable

from redi.atomic import fsync_dir as _fsync_dir, kill_point, temporary_name, write_text_atomic

STATE_FILE = "trainer_state.json"


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def atomic_dir(target: Path, write: Callable[[Path], None], point: str | None = None) -> Path:
    """Run ``write(tmp)`` and move ``tmp`` to ``target`` in one rename. ``point`` names the kill point just
    before the rename (every file is written and fsynced, nothing is in place yet)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    if point:
        kill_point(point)
    if target.exists():  # a kill between these renames leaves no target: only sft_final/ and final/ are
        old = temporary_name(target, "old")  # rewritten, and a resume redoes both from an earlier state
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    _fsync_dir(target.parent)
    return target


def write_state(folder: Path, state: dict) -> None:
    """trainer_state.json, written inside the checkpoint's temporary folder (its rename commits it)."""
    write_text_atomic(folder / STATE_FILE, json.dumps(state, indent=2))


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


def latest_intact(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files are whole, and a note for each newer one that is not (a disk that
    filled up, a copy cut short: the atomic rename rules out a kill)."""
    damaged = []
    for folder in reversed(list_checkpoints(run_dir)):
        problem = damage(folder)
        if problem is None:
            return folder, damaged
        damaged.append(f"{folder}: {problem}")
    return None, damaged


def damage(folder: Path) -> str | None:
    """Why ``folder``'s weights, optimizer state or trainer state cannot be loaded, or None. Cheap: sizes and
    headers only (a safetensors file must end where its header says; a torch file is a zip with its index)."""
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            problem = _safetensors_damage(path)
        elif path.suffix == ".pt":
            problem = None if zipfile.is_zipfile(path) else f"{path.name} is cut or not a torch file"
        elif path.name == STATE_FILE:
            problem = None if _json_object(path) else f"{STATE_FILE} is cut or not JSON"
        else:
            continue
        if problem:
            return problem
    return None


def _safetensors_damage(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else size
        header = _json_bytes(fh.read(length)) if 8 + length <= size else None
    if not isinstance(header, dict):
        return f"{path.name} is cut ({size:,} bytes, no complete header)"
    end = 8 + length + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return None if end == size else f"{path.name} is cut ({size:,} of {end:,} bytes)"


def _json_bytes(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


def _json_object(path: Path) -> bool:
    return isinstance(_json_bytes(path.read_bytes()), dict)


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def prune(run_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
