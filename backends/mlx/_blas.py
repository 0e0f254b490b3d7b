"""Load a fast BLAS for mlx[cpu] on Linux before ``mlx.core`` is imported.

The mlx-cpu wheel links a reference BLAS (~6 GFLOP/s fp32 matmul on this project's CI boxes). Debian's
``libopenblas0-pthread`` exports the same cblas symbols; loaded with RTLD_GLOBAL before libmlx, the dynamic
linker binds libmlx's calls to it instead (~330 GFLOP/s measured). Without it everything still runs, only
slower. Nothing here imports mlx, so this module is safe to import where MLX is absent.

``REDI_OPENBLAS=/path/libopenblas.so.0`` picks a library; ``REDI_OPENBLAS=0`` turns the preload off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# Path of the library that was preloaded, or None; read by tests and `docs/mlx.md`'s timing script.
LOADED: str | None = None


def _find() -> str | None:
    chosen = os.environ.get("REDI_OPENBLAS", "")
    if chosen == "0":
        return None
    if chosen:
        return chosen
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


def preload_openblas() -> str | None:
    """Preload OpenBLAS if present; a no-op off Linux or once mlx.core is already imported (too late)."""
    global LOADED
    if LOADED or sys.platform != "linux" or "mlx.core" in sys.modules:
        return LOADED
    path = _find()
    if not path:
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    LOADED = path
    return path
