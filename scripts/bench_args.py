"""Command-line options shared by the benchmark scripts (run from scripts/, so a plain import finds this)."""
from __future__ import annotations

import argparse
from typing import Any


def add_defaults(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """One ``--NAME`` option per keyword (underscores become dashes), typed by its default, with no help text."""
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
