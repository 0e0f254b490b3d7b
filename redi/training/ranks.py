"""Multi-process (torchrun) helpers: every rank trains, only rank 0 writes files.

With one process (``backend.world_size == 1``) each helper reduces to the plain single-process action.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from redi.backend import Backend, MicroBatch
from redi.training import checkpoint as ckpt


def on_main(backend: Backend, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and hand its result to every rank (one process: just ``fn()``). With
    ``fn = lambda: None`` it is a barrier."""
    if backend.world_size == 1:
        return fn()
    return backend.all_gather_object(fn() if backend.rank == 0 else None)[0]


def save_on_main(backend: Backend, folder: Path, write: Callable[[str | None], None], point: str | None = None) -> None:
    """An atomic folder written by rank 0 through ``write(tmp_path)``; the other ranks call ``write(None)`` (they
    take part in gathering the weights) and wait until the folder is in place (stage 2 loads sft_final/ right
    after). ``point``: the kill point before the folder's rename (redi.atomic)."""
    if backend.rank == 0:
        ckpt.atomic_dir(folder, lambda tmp: write(str(tmp)), point)
    else:
        write(None)
    on_main(backend, lambda: None)


def rank_share(batches: list[MicroBatch], rank: int, world: int) -> list[tuple[int, MicroBatch]]:
    """Rank ``rank``'s micro-batches of one step: ``rank``, ``rank + world``, ... with their indices. Every
    rank runs the same number of forward/backward passes (collectives must match), so a rank short of
    micro-batches repeats one with weight 0 and index -1: it adds nothing to the gradient or the metrics."""
    if world == 1:
        return list(enumerate(batches))
    share = [(i, batches[i]) for i in range(rank, len(batches), world)]
    while len(share) < -(-len(batches) // world):
        share.append((-1, dataclasses.replace(batches[rank % len(batches)], weight=0.0)))
    return share


class NoWriter:
    """The metrics writer of ranks other than 0."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
