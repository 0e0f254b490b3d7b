"""Judging untrusted model output in worker processes: a CPU-time limit per item inside the worker, an
address-space limit per worker, and a wall-clock watchdog in the parent for what the in-worker limit
cannot interrupt. Used by redi.evaluation.grading (math-verify and the rllm grader).

Two ways in, the same limits: ``run_in_workers`` (a pool, for many judgements on several cores) and
``run_in_judge_process`` (one long-lived process, for a few judgements or ``--workers 0/1``). Untrusted text is
never judged in the calling process: one response (``\\boxed{\\operatorname{zeros}(8000,8000)}``) took 3.5 GB there.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
from contextlib import contextmanager

from redi.procfs import proc_kib_bytes


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
    User plus system time (ITIMER_PROF): page-fault-heavy judging spends most of its time in the kernel, and
    a user-time clock let it run 2.5x past the limit. Signals reach only the main thread (and Windows has no
    SIGPROF), so elsewhere it runs unbounded: the judging processes call it from their main thread."""
    if (not cpu_seconds or cpu_seconds <= 0 or not hasattr(signal, "SIGPROF")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    previous = signal.signal(signal.SIGPROF, _raise_timeout)
    signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


# ----------------------------------------------------------------------------------------- worker processes

_STARTED: object = None  # shared array in each worker: task start time, -1 once done, 0 before it starts


# A judgement may allocate this much beyond what the worker holds after its imports; more is a MemoryError,
# which counts as a timeout (sympy on adversarial model output can otherwise eat the machine).
WORKER_EXTRA_MEMORY = 2 << 30


# Address-space size past which a judgement counts as out of memory (a timeout): math-verify and sympy catch
# MemoryError as a parse failure, so the MemoryError itself often never reaches us. None: no limit set.
_NEARLY_FULL: int | None = None


def _limit_memory(extra: int) -> None:
    global _NEARLY_FULL
    try:
        import resource

        with open("/proc/self/statm") as handle:
            size = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        # A failed allocation (a list doubling past the limit) can leave the peak well below the limit.
        _NEARLY_FULL = limit - (limit - size) // 4
    except (ImportError, OSError, ValueError):  # not Linux: the CPU-time limit still bounds each judgement
        pass


def _vm_peak() -> int:
    """This process's peak address-space size in bytes (Linux), 0 where unknown."""
    return proc_kib_bytes("/proc/self/status", "VmPeak") or 0


def _judged(item_fn, args: tuple, on_memory) -> tuple[object, bool]:
    """(``item_fn(*args)``, False), or (``on_memory``, True) when the item drove the process's address space
    to near its limit (then it most likely failed an allocation, whatever it returned)."""
    before = _vm_peak()
    result = item_fn(*args)
    after = _vm_peak()
    if _NEARLY_FULL is not None and after > before and after >= _NEARLY_FULL:
        return on_memory, True
    return result, False


def _init_worker(started) -> None:
    global _STARTED
    _STARTED = started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    _limit_memory(WORKER_EXTRA_MEMORY)


def _run_chunk(item_fn, chunk, on_memory):
    results = []
    for index, args in chunk:
        _STARTED[index] = time.time()
        results.append((index, _judged(item_fn, args, on_memory)[0]))
        _STARTED[index] = -1.0
    return results


def _start_method() -> str:
    # Not fork: the caller may hold threads (torch, tokenizers) and fork would copy their locks mid-state.
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _context():
    ctx = multiprocessing.get_context(_start_method())
    if ctx.get_start_method() == "forkserver":
        # Imported (and math-verify's grammar loaded) once in the fork server, not in every judging process.
        ctx.set_forkserver_preload(["redi.evaluation.grading", "redi.evaluation.workers",
                                    "redi.evaluation.rllm_grader", "math_verify", "redi.evaluation.warm_judge"])
    return ctx


def run_in_workers(item_fn, items: list[tuple], *, workers: int, hard_limit: float, on_hang,
                   startup_limit: float = 120.0):
    """``[item_fn(*args) for args in items]`` in worker processes, in order, chunked to keep IPC per chunk.

    An item still running ``hard_limit`` seconds after it started (a hang the in-worker alarm cannot interrupt,
    or a worker that died) gets ``on_hang`` as its result; the pool is killed and the unfinished rest re-run.
    An item that fills its worker's address space gets ``on_hang`` too.
    Workers that start no item within ``startup_limit`` seconds (multiprocessing re-spawns workers that die at
    import, e.g. when ``__main__`` cannot be re-imported) raise RuntimeError instead of waiting forever.
    """
    import numpy as np

    results: dict[int, object] = {}
    ctx = _context()
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
            pending = [pool.apply_async(_run_chunk, (item_fn, chunk, on_hang)) for chunk in chunks]
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


# ------------------------------------------------------------------------------------ one judging process

# A judging process whose resident memory grew this much past its start is replaced after the item (a
# MemoryError or a big sympy object leaves the heap grown; rows after it should not run beside that).
_RECYCLE_GROWTH = 256 << 20


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _serve(conn) -> None:
    """The judging process: the pool workers' limits, then (item_fn, args, on_memory) in, (result, retiring)
    out. It retires after running out of memory (its peak stays near the limit) or growing too much."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_memory(WORKER_EXTRA_MEMORY)
    baseline = _resident_bytes()
    while True:
        try:
            item_fn, args, on_memory = conn.recv()
        except (EOFError, OSError):
            return
        result, exhausted = _judged(item_fn, args, on_memory)
        retiring = exhausted or _resident_bytes() - baseline > _RECYCLE_GROWTH
        conn.send((result, retiring))
        if retiring:
            return


class _JudgeProcess:
    """A long-lived judging process, started on first use and replaced after a hang, a death or growth."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self._stillborn = 0  # fresh processes in a row that died before answering once

    def _start(self) -> None:
        ctx = _context()
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="redi-judge")
        self._proc.start()
        child.close()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
            self._conn.close()
        self._proc = self._conn = None

    def run(self, item_fn, items: list[tuple], hard_limit: float, on_hang) -> list:
        with self._lock:
            return [self._one(item_fn, args, hard_limit, on_hang) for args in items]

    def _one(self, item_fn, args: tuple, hard_limit: float, on_hang):
        fresh = self._proc is None or not self._proc.is_alive()
        if fresh:
            self.stop()
            self._start()
        try:
            self._conn.send((item_fn, args, on_hang))
            if self._conn.poll(hard_limit):
                result, retiring = self._conn.recv()
                self._stillborn = 0
                if retiring:
                    self.stop()
                return result
        except (EOFError, OSError):  # the process died mid-item (the OOM killer, a crash in C code)
            self._stillborn += fresh
            if self._stillborn >= 2:  # not the items: the process cannot start (as run_in_workers says)
                self.stop()
                raise RuntimeError("the grading process did not start; if this runs from stdin or a notebook, "
                                   "run it from a script file (multiprocessing re-imports it)") from None
        except BaseException:  # Ctrl-C: an answer may still be on its way, so this process cannot be reused
            self.stop()
            raise
        self.stop()
        return on_hang


_JUDGE = _JudgeProcess()


def run_in_judge_process(item_fn, items: list[tuple], *, hard_limit: float, on_hang) -> list:
    """``[item_fn(*args) for args in items]`` in one separate process under the workers' limits; an item that
    runs ``hard_limit`` wall seconds, kills the process or fills its address space gets ``on_hang``."""
    return _JUDGE.run(item_fn, items, hard_limit, on_hang) if items else []
