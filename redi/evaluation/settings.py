"""The settings guard for commands that append to an output folder and resume (`redi eval`, `redi data
generate`): the first run records what makes its samples what they are; a later run into the same folder
must match it, or it is refused with the differing keys named (as `redi train --resume` does), so one
model's samples are never appended to and graded with another's. ``--force`` overrides and records the
new settings.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from redi.errors import UserError

SETTINGS_FILE = "settings.json"


def model_identity(model: str) -> str:
    """A local model as its absolute path (``./ckpt`` and ``/abs/ckpt`` are the same model); a hub name as is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def settings_drift(saved: dict, now: dict) -> list[str]:
    return sorted(key for key in set(saved) | set(now) if saved.get(key, "<unset>") != now.get(key, "<unset>"))


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def guard_settings(folder: str | Path, settings: dict, *, force: bool = False, data_file: str = "samples.jsonl",
                   flag: str = "--output") -> None:
    """Write ``settings`` (JSON-ready) to ``folder/settings.json``, or check them against the recorded ones.

    Refused (UserError): recorded settings that differ, naming the keys; or a ``data_file`` already in the
    folder with no settings beside it (written by an older redi: nothing says what made it). ``force``
    accepts either and records the new settings.
    """
    folder = Path(folder)
    path = folder / SETTINGS_FILE
    now = json.loads(json.dumps(settings))  # what a reload will compare against (tuples become lists)
    if path.exists() and not force:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: cannot read the recorded settings ({err}); --force to overwrite") from None
        if not isinstance(saved, dict):
            raise UserError(f"{path}: not a JSON object; --force to overwrite")
        drift = settings_drift(saved, now)
        if drift:
            details = "; ".join(f"{k}: {_show(saved.get(k))} -> {_show(now.get(k))}" for k in drift)
            raise UserError(f"{flag} {folder} holds samples made with other settings, differing in: "
                            f"{', '.join(drift)} ({details}); use another {flag}, or --force to add to them")
        return
    if not path.exists() and (folder / data_file).exists() and not force:
        raise UserError(f"{flag} {folder}: {data_file} is there but {SETTINGS_FILE} is not, so nothing says which "
                        f"model and settings made it; use another {flag}, or --force to add to it")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(now, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
