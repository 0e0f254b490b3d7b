"""Local path or Hugging Face hub name? Decided here, once, so that a typo fails at once.

A missing path that looks local (``runs/sftt``, ``bad/x.jsonl``, ``./m``) used to be tried as a hub name and
spent 30-50 s in retries before failing. Now: a string that does not exist on disk is only handed to the hub
when it has the shape ``org/name``, its first part is not a local folder, it has no data-file suffix, and the
hub can be used (not ``HF_HUB_OFFLINE``, or the name is in the local cache; reachable within a few seconds).
"""
from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from redi.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".gz", ".arrow", ".csv", ".yaml", ".safetensors")


def looks_local(spec: str) -> bool:
    """True when ``spec`` can only be meant as a path on this machine (whether or not it exists)."""
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        return True
    first, name = spec.split("/")
    return not first or not name or Path(first).is_dir() or Path(spec).suffix in LOCAL_SUFFIXES


def hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def in_hub_cache(repo_id: str, kind: str) -> bool:
    """A snapshot of ``repo_id`` (kind: model | dataset) is in the hub cache or the datasets cache."""
    from huggingface_hub import constants

    if (Path(constants.HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}").is_dir():
        return True
    if kind != "dataset":
        return False
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    return (datasets_cache / repo_id.replace("/", "___")).is_dir()


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connection to the hub endpoint; a box without network answers in ``timeout_s`` at most."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def hub_unusable(repo_id: str, kind: str) -> str | None:
    """Why ``repo_id`` cannot come from the hub right now (None when it can)."""
    if in_hub_cache(repo_id, kind):
        return None
    if hub_offline():
        return "HF_HUB_OFFLINE is set and it is not in the local hub cache"
    if not hub_reachable():
        return "the hub is unreachable and it is not in the local hub cache"
    return None


def locate(spec: str, kind: str, what: str) -> Path | str:
    """An existing local path, or a hub name worth trying; otherwise one line saying why not."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if looks_local(spec):
        raise UserError(f"{what} not found: {spec}")
    why = hub_unusable(spec, kind)
    if why:
        raise UserError(f"{what} not found: {spec} (no such local path; as a hub name: {why})")
    return spec
