"""Judging untrusted model output in worker processes: a CPU-time limit per item inside the worker, an
address-space limit per worker, and a wall-clock watchdog in the parent for what the in-worker limit
cannot interrupt. Used by redi.evaluation.grading (math-verify and the rllm grader).
"""
from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
from contextlib import contextmanager


class _ItemTimeout(BaseException):
    # BaseException on purpose: math-verify and sympy catch Exception broadly and would otherwise swallow the
    # timeout and keep computing with no limit left.
    pass


def _raise_timeout(signum, frame):
    raise _ItemTimeout()


@contextmanager
def _time_limit(cpu_seconds: float | None):
    """Limit on this process's CPU time, not wall time, so that a busy machine (say, generation running beside
    the grader) cannot turn right answers into timeouts and a regrade always reproduces the first grade.
    Signals reach only the main thread (and Windows has no SIGVTALRM), so elsewhere it runs unbounded."""
    if (not cpu_seconds or cpu_seconds <= 0 or not hasattr(signal, "SIGVTALRM")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    previous = signal.signal(signal.SIGVTALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_VIRTUAL, cpu_seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


# ----------------------------------------------------------------------------------------- worker processes

_STARTED: object = None  # shared array in each worker: task start time, -1 once done, 0 before it starts


# A judgement may allocate this much beyond what the worker holds after its imports; more is a MemoryError,
# which counts as a wrong answer (sympy on adversarial model output can otherwise eat the machine).
WORKER_EXTRA_MEMORY = 2 << 30


def _limit_memory(extra: int) -> None:
    try:
        import resource

        with open("/proc/self/statm") as handle:
            size = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):  # not Linux: the CPU-time limit still bounds each judgement
        pass


def _init_worker(started) -> None:
    global _STARTED
    _STARTED = started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    _limit_memory(WORKER_EXTRA_MEMORY)


def _run_chunk(item_fn, chunk):
    results = []
    for index, args in chunk:
        _STARTED[index] = time.time()
        results.append((index, item_fn(*args)))
        _STARTED[index] = -1.0
    return results


def _start_method() -> str:
    # Not fork: the caller may hold threads (torch, tokenizers) and fork would copy their locks mid-state.
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def run_in_workers(item_fn, items: list[tuple], *, workers: int, hard_limit: float, on_hang,
                   startup_limit: float = 120.0):
    """``[item_fn(*args) for args in items]`` in worker processes, in order, chunked to keep IPC per chunk.

    An item still running ``hard_limit`` seconds after it started (a hang the in-worker alarm cannot interrupt,
    or a worker that died) gets ``on_hang`` as its result; the pool is killed and the unfinished rest re-run.
    Workers that start no item within ``startup_limit`` seconds (multiprocessing re-spawns workers that die at
    import, e.g. when ``__main__`` cannot be re-imported) raise RuntimeError instead of waiting forever.
    """
    import numpy as np

    results: dict[int, object] = {}
    ctx = multiprocessing.get_context(_start_method())
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["redi.evaluation.grading", "redi.evaluation.workers", "redi.evaluation.rllm_grader", "math_verify"])
    shared = ctx.RawArray("d", len(items))
    started = np.frombuffer(shared, dtype=np.float64)
    todo = np.ones(len(items), dtype=bool)
    while todo.any():
        remaining = np.flatnonzero(todo).tolist()
        size = max(1, min(256, math.ceil(len(remaining) / (workers * 4))))
        chunks = [[(i, items[i]) for i in remaining[s:s + size]] for s in range(0, len(remaining), size)]
        hung = np.zeros(0, dtype=np.int64)
        pool_start = time.time()
        with ctx.Pool(min(workers, len(chunks)), initializer=_init_worker, initargs=(shared,)) as pool:
            pending = [pool.apply_async(_run_chunk, (item_fn, chunk)) for chunk in chunks]
            while pending and not len(hung):
                pending[0].wait(0.05)
                still = []
                for result in pending:
                    if result.ready():
                        for index, value in result.get():
                            results[index] = value
                            todo[index] = False
                    else:
                        still.append(result)
                pending = still
                # One snapshot: workers keep writing, and an item that finishes between two reads (start time,
                # then -1) would look as if it started long ago.
                now, snapshot = time.time(), started.copy()
                hung = np.flatnonzero(todo & (snapshot > 0) & (now - snapshot > hard_limit))
                if pending and now - pool_start > startup_limit and not (todo & (snapshot != 0)).any():
                    pool.terminate()
                    raise RuntimeError("grading worker processes did not start; if this runs from stdin or "
                                       "a notebook, run it from a script file (multiprocessing re-imports it)")
            pool.terminate()
        for index in hung.tolist():
            results[index] = on_hang
            todo[index] = False
        started[todo] = 0.0  # results of a killed chunk are lost; those items run again
    return [results[i] for i in range(len(items))]
