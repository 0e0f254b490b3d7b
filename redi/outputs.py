"""``--force`` lets a command replace its own earlier outputs, never the files it reads: one check, by file
identity (``os.path.samefile``), so a relative path, a symlink or ``F/../F`` cannot slip past it."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from redi.errors import UserError


def refuse_overwriting_inputs(inputs: Iterable[str | Path], outputs: Iterable[str | Path], *,
                              flag: str = "--output") -> None:
    """UserError when any existing output file is one of the inputs (whatever ``--force`` says)."""
    existing_inputs = [Path(p) for p in inputs if Path(p).exists()]
    for output in outputs:
        output = Path(output)
        if not output.exists():
            continue
        for source in existing_inputs:
            if os.path.samefile(source, output):
                raise UserError(f"{flag} would replace the input file {source} (as {output}); "
                                "write to another folder (--force never replaces an input)")
