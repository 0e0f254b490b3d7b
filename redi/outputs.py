"""Rules for what commands write.

- ``--force`` lets a command replace its own earlier outputs, never the files it reads: one check, by file
  identity (``os.path.samefile``), so a relative path, a symlink or ``F/../F`` cannot slip past it.
- A JSON line is always encodable as UTF-8: a lone UTF-16 surrogate (``"\\ud800"`` in an input row, then in an
  extracted answer) is written escaped instead of crashing the write.
"""
from __future__ import annotations

import json
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
                raise UserError(f"{flag} would replace the input file {source} (as {output}); choose another "
                                f"{flag} (an input is never replaced, not even with --force)")


def json_line(record) -> str:
    """``record`` as one JSON line, readable UTF-8 where it can be, ``\\uXXXX`` escapes where it cannot."""
    text = json.dumps(record, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only JSON's escape can carry it
        text = json.dumps(record)
    return text + "\n"
