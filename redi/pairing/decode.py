"""Reading the input of `redi data pair` in parallel-friendly pieces: 4 MB byte ranges of a jsonl file (cut
at line starts, so adjacent ranges share no line and miss none), parquet row groups, arrow batches.

A task is a small picklable named tuple (one type per kind of piece, below); ``decode_task`` turns it into ``(row_index, row)`` pairs in whichever
process runs it, reading the bytes itself, so the main process only hands out offsets. ``count_lines``
counts a range's rows at memchr speed with the same blank-line rule as the decoder (a whitespace-only line
is not a row, as in ``datasets``' json reader), so the row numbers of the count pass and the reading pass
agree, and the seed-42 shuffle can be computed before any row is read.
"""
from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Union


@dataclass
class BadLine:
    line: int
    detail: str


class FileRange(NamedTuple):
    """A byte range of a jsonl file (``gz``: a whole .gz file, end -1), as the count pass reads it."""

    path: str
    start: int
    end: int
    gz: bool


class JsonlRange(NamedTuple):
    """Rows of a plain jsonl file's byte range; ``index``/``line_no``: its first row and line; ``label``: the
    file name in messages when there are several files."""

    path: str
    start: int
    end: int
    index: int
    line_no: int
    label: str


class JsonlBlock(NamedTuple):
    """Whole lines of a .gz file, decompressed by the main process (it cannot be cut by offset)."""

    block: bytes
    index: int
    line_no: int
    label: str


class ParquetGroup(NamedTuple):
    path: str
    group: int
    index: int
    batch_rows: int


class ArrowBatch(NamedTuple):
    batch: Any  # a pyarrow RecordBatch
    index: int


class RowList(NamedTuple):
    """Rows already in memory (a JSON array file, a hub dataset's chunk)."""

    rows: list
    index: int


Task = Union[JsonlRange, JsonlBlock, ParquetGroup, ArrowBatch, RowList]


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


RANGE_BYTES = 4 << 20
# A line holding only ASCII whitespace (bytes.isspace) is not a row, as in ``datasets``' json reader.
_BLANK_AFTER_NEWLINE = re.compile(rb"\n(?=[ \t\r\x0b\x0c]*\n)")


def _line_start(handle, offset: int, size: int) -> int:
    """Start of the first line that begins at or after ``offset``."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    handle.seek(offset - 1)
    handle.readline()
    return handle.tell()


def read_range(path: str, start: int, end: int) -> bytes:
    """The whole lines that begin inside [start, end): adjacent ranges share no line and miss none."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        first, stop = _line_start(handle, start, size), _line_start(handle, end, size)
        handle.seek(first)
        return handle.read(stop - first)


def count_range(file_range: FileRange) -> tuple[int, int]:
    """(rows, lines) of one range; a .gz file is one range, read whole."""
    path, start, end, gz = file_range
    if not gz:
        return count_lines(read_range(path, start, end))
    rows = lines = 0
    with gzip.open(path, "rb") as handle:
        for block in blocks(handle):
            r, n = count_lines(block)
            rows, lines = rows + r, lines + n
    return rows, lines


def blocks(handle) -> Iterator[bytes]:
    """Blocks of whole lines, about RANGE_BYTES each, from a stream."""
    while True:
        block = handle.read(RANGE_BYTES)
        if not block:
            return
        if not block.endswith(b"\n"):
            block += handle.readline()
        yield block


def gzip_blocks(path: str, index: int, label: str) -> Iterator[JsonlBlock]:
    """A .gz file cannot be cut by offset: the main process decompresses it and ships whole-line blocks."""
    line_no = 1
    with gzip.open(path, "rb") as handle:
        for block in blocks(handle):
            rows, lines = count_lines(block)
            yield JsonlBlock(block, index, line_no, label)
            index += rows
            line_no += lines


def _is_blank(line: bytes) -> bool:
    return not line or line.isspace()


def count_lines(block: bytes) -> tuple[int, int]:
    """(rows, physical lines) in a block of whole lines, at memchr speed: rows skip blank lines."""
    if not block:
        return 0, 0
    lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
    first_end = block.find(b"\n")
    blank = _is_blank(block[:first_end] if first_end >= 0 else block)
    blank += len(_BLANK_AFTER_NEWLINE.findall(block))
    if not block.endswith(b"\n"):
        last = block[block.rfind(b"\n") + 1:]
        blank += _is_blank(last) and first_end >= 0  # a lone unterminated line was counted as the first
    return lines - blank, lines


_PARQUET_FILES: dict[str, object] = {}


def decode_task(task: Task, columns: list[str] | None) -> list[tuple[int, object]]:
    """``(row_index, row)`` for every row of a task; a line that is not JSON becomes a ``BadLine``."""
    if isinstance(task, (JsonlRange, JsonlBlock)):
        index, line_no, label = task.index, task.line_no, task.label
        block = read_range(task.path, task.start, task.end) if isinstance(task, JsonlRange) else task.block
        rows: list[tuple[int, object]] = []
        for offset, line in enumerate(block.split(b"\n")):
            if _is_blank(line):
                continue
            try:
                row = json.loads(line)
            except ValueError as err:  # UnicodeDecodeError is a ValueError too
                where = f"{label} line {line_no + offset}" if label else f"line {line_no + offset}"
                why = "not UTF-8" if isinstance(err, UnicodeDecodeError) else f"not JSON ({str(err).split(':')[0]})"
                row = BadLine(line_no + offset, f"{where}: {why}")
            rows.append((index, row))
            index += 1
        return rows
    if isinstance(task, ParquetGroup):
        import pyarrow.parquet as pq

        path, group, index, batch_rows = task
        pf = _PARQUET_FILES.get(path)
        if pf is None:
            _PARQUET_FILES.clear()  # keep one open file per process
            pf = _PARQUET_FILES[path] = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        wanted = [c for c in columns if c in names] if columns is not None else None
        table = pf.read_row_group(group, columns=wanted)
        rows = []
        for record_batch in table.to_batches(max_chunksize=batch_rows):
            rows.extend(record_batch.to_pylist())
        return [(index + i, row) for i, row in enumerate(rows)]
    if isinstance(task, ArrowBatch):
        return [(task.index + i, row) for i, row in enumerate(task.batch.to_pylist())]
    rows, index = task
    return [(index + i, row) for i, row in enumerate(rows)]


