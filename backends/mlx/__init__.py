"""MLX backend (Apple silicon; Linux through mlx[cpu]).

Importing the package preloads OpenBLAS on Linux when it is installed, before any submodule imports
``mlx.core`` (see ``_blas.py``).
"""
from redi.backends.mlx._blas import preload_openblas

preload_openblas()
