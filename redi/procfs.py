"""Linux's /proc files, read for one ``Key:  N kB`` line (the memory figures that grading and the activation
planner read)."""
from __future__ import annotations


def proc_kib_bytes(path: str, key: str) -> int | None:
    """The value of ``key`` in ``path`` (e.g. MemAvailable in /proc/meminfo) in bytes; None where unreadable."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
