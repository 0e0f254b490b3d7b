"""Writers for `redi data pair`: rows in TRL's conversational form, to parquet or jsonl, in a chosen order.

The paper's order is that of ``Dataset.shuffle(seed=42)`` over the whole raw set, which a stream cannot
produce directly. ``BucketedSink`` does an external sort instead: each output row carries its position in the
shuffled order; rows go to one of B temporary arrow files by position range, and at the end each file
(about 1/B of the output) is read, sorted and appended. Memory stays near one bucket plus small buffers.

Output bytes depend only on the rows and their order (fixed flush sizes, no timestamps), so reruns are
byte-identical.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
SFT_SCHEMA = pa.schema([("prompt", MESSAGES), ("completion", MESSAGES), ("problem_id", pa.string()),
                        ("source", pa.string()), ("generation_index", pa.int64())])
PAIR_SCHEMA = pa.schema([("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES),
                         ("problem_id", pa.string()), ("source", pa.string()), ("chosen_index", pa.int64()),
                         ("rejected_index", pa.int64())])
# Records as workers build them: SFT (problem, completion, problem_id, source, index);
# pair (problem, chosen, rejected, problem_id, source, chosen_index, rejected_index).
_ROLES = {"sft": ("user", "assistant"), "pairs": ("user", "assistant", "assistant")}

FLUSH_ROWS = 512


def _messages(texts: list[str], role: str) -> pa.Array:
    # One-message lists built column-wise: far faster than pa.array over dicts, same result.
    n = len(texts)
    contents = pa.array(texts, pa.string())
    roles = pa.array([role] * n, pa.string())
    structs = pa.StructArray.from_arrays([roles, contents], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(pa.array(range(n + 1), pa.int32()), structs)


def records_to_table(kind: str, records: list[tuple]) -> pa.Table:
    columns = list(zip(*records)) if records else [[] for _ in range(5 if kind == "sft" else 7)]
    n_text = len(_ROLES[kind])
    arrays = [_messages(list(columns[i]), role) for i, role in enumerate(_ROLES[kind])]
    arrays += [pa.array(columns[n_text], pa.string()), pa.array(columns[n_text + 1], pa.string())]
    arrays += [pa.array(col, pa.int64()) for col in columns[n_text + 2:]]
    return pa.Table.from_arrays(arrays, schema=SFT_SCHEMA if kind == "sft" else PAIR_SCHEMA)


class FileWriter:
    """The final file (parquet or jsonl), written under a temporary name and renamed when complete."""

    def __init__(self, path: Path, kind: str, fmt: str):
        self.path = path
        self.kind = kind
        self.fmt = fmt
        self.rows = 0
        self._tmp = path.with_name(f".{path.name}.partial")
        schema = SFT_SCHEMA if kind == "sft" else PAIR_SCHEMA
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        else:
            self._handle = open(self._tmp, "w", encoding="utf-8")

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.rows += table.num_rows
        if self.fmt == "parquet":
            self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
            return
        for row in table.to_pylist():
            self._handle.write(json.dumps(row, ensure_ascii=False))
            self._handle.write("\n")

    def close(self) -> None:
        if self.fmt == "parquet":
            self._writer.close()
        else:
            self._handle.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close() if self.fmt == "parquet" else self._handle.close()
        finally:
            self._tmp.unlink(missing_ok=True)


def shuffled_positions(n: int, seed: int):
    """Position of each input row in ``datasets.Dataset.shuffle(seed=seed)`` order: that method draws
    ``np.random.default_rng(seed).permutation(n)`` and selects those rows; this is its inverse."""
    import numpy as np

    permutation = np.random.default_rng(seed).permutation(n)
    positions = np.empty(n, dtype=np.int64)
    positions[permutation] = np.arange(n, dtype=np.int64)
    return positions


def bucket_count(total_positions: int, rows_per_bucket: int = 4096, most: int = 1024) -> int:
    return max(1, min(most, -(-total_positions // rows_per_bucket)))


def bucketize(kind: str, records: list[tuple], rows: list[int], positions, buckets: int, total: int):
    """(table of the records sorted by output bucket, with ``_position``; bucket boundaries). Runs in workers.

    ``rows`` are the records' input rows; ``positions`` maps input row -> output position (None = input order).
    Sorting the tuples before building the table avoids reordering the (large) string columns afterwards.
    """
    import numpy as np

    position = positions[rows] if positions is not None else np.asarray(rows, dtype=np.int64)
    bucket = position * buckets // max(total, 1)
    order = np.argsort(bucket, kind="stable")
    table = records_to_table(kind, [records[i] for i in order])
    table = table.append_column("_position", pa.array(position[order], pa.int64()))
    return table, np.searchsorted(bucket[order], np.arange(buckets + 1))


class BucketedSink:
    """Rows arrive in input order, already split by bucket (``bucketize``); written in position order.

    External bucket sort: bucket b holds positions [b*N/B, (b+1)*N/B). Buffers are spilled to one arrow
    stream file per bucket whenever they pass ``budget`` bytes together; at the end each bucket is read,
    sorted and appended, so memory stays near one bucket (N/B input rows' outputs) plus the budget.
    """

    def __init__(self, writer: FileWriter, total_positions: int, buckets: int, tmp_dir: Path,
                 budget: int = 128 << 20):
        self.writer = writer
        self.total = max(total_positions, 1)
        self.buckets = max(1, min(buckets, self.total))
        self.tmp_dir = tmp_dir
        self.budget = budget
        self._buffers: list[list[pa.Table]] = [[] for _ in range(self.buckets)]
        self._buffered = 0
        self._files: list[tuple | None] = [None] * self.buckets
        schema = SFT_SCHEMA if writer.kind == "sft" else PAIR_SCHEMA
        self._spill_schema = schema.append(pa.field("_position", pa.int64()))

    def add(self, table: pa.Table, bounds) -> None:
        """A table from ``bucketize`` (sorted by bucket, with ``_position``) and its bucket boundaries."""
        if table.num_rows == 0:
            return
        for b in range(self.buckets):
            size = int(bounds[b + 1] - bounds[b])
            if size:
                part = table.slice(int(bounds[b]), size)
                self._buffers[b].append(part)
                self._buffered += part.nbytes
        if self._buffered >= self.budget:
            for b in range(self.buckets):
                self._spill(b)
            self._buffered = 0

    def _path(self, b: int) -> Path:
        return self.tmp_dir / f"{self.writer.kind}-{b:05d}.arrow"

    def _spill(self, b: int) -> None:
        if not self._buffers[b]:
            return
        if self._files[b] is None:
            handle = pa.OSFile(str(self._path(b)), "wb")
            self._files[b] = (handle, pa.ipc.new_stream(handle, self._spill_schema))
        self._files[b][1].write_table(pa.concat_tables(self._buffers[b]).combine_chunks())
        self._buffers[b] = []

    def finish(self) -> None:
        import pyarrow.compute as pc

        for b in range(self.buckets):
            if self._files[b] is None:
                parts = self._buffers[b]
                table = pa.concat_tables(parts) if parts else None
            else:
                self._spill(b)
                handle, stream = self._files[b]
                stream.close()
                handle.close()
                with pa.OSFile(str(self._path(b))) as source:
                    table = pa.ipc.open_stream(source).read_all()
                self._path(b).unlink()
            self._buffers[b] = []
            if table is None or table.num_rows == 0:
                continue
            # Stable: outputs of one input row (several SFT traces or pairs) keep their generation order.
            table = table.take(pc.sort_indices(table["_position"])).drop_columns(["_position"])
            for start in range(0, table.num_rows, FLUSH_ROWS):
                self.writer.write(table.slice(start, FLUSH_ROWS).combine_chunks())
            del table
        self.writer.close()

    def abort(self) -> None:
        for entry in self._files:
            if entry is not None:
                entry[1].close()
                entry[0].close()
        self.writer.abort()
