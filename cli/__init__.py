"""The `redi` command line: a thin Typer layer over the Python API (installed as ``redi.cli``)."""
