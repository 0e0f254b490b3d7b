"""Inputs of `redi data pair`: jsonl (optionally .gz), a JSON list, parquet, a save_to_disk folder, a folder of
data files, or a hub name, resolved to an ``InputSource`` that counts its rows and cuts itself into tasks
(see pairing_decode). Rows come out as ``(row_index, row)``; ``row`` is a dict, or a ``BadLine`` for a line
that is not JSON, so one bad line costs one row, never the run.

Memory stays bounded by a task, whatever the input size: parquet is read row group by row group with only
the needed columns, arrow files through plain reads (a memory map would count the whole file as resident).
Row indices count every row the way ``datasets`` would number them (blank jsonl lines do not count), so the
seed-42 shuffle of the paper can be reproduced from them.
"""
from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from redi.pairing import decode as decode
from redi.errors import UserError
from redi.hub import locate
from redi.pairing.decode import (ArrowBatch, FileRange, JsonlBlock, JsonlRange, ParquetGroup, RowList, Task, count_range,
                                 decode_task, open_binary, read_range)

_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PEEK_ROWS = 200  # rows read to detect the schema of a jsonl input


@dataclass
class InputSource:
    name: str  # what the user passed, for messages
    kind: str  # jsonl | json-array | parquet | arrow | hub
    paths: list[Path] = field(default_factory=list)
    columns: list[str] | None = None  # known without reading rows (parquet, arrow, hub features)
    size_bytes: int | None = None
    _hub: object = None
    _num_rows: int | None = None
    _range_counts: list | None = None

    # -- discovery ------------------------------------------------------------------------------------------

    def peek_columns(self) -> list[str]:
        """Column names: from the file schema, or the union of keys of the first jsonl rows."""
        if self.columns is not None:
            return self.columns
        if self.kind == "jsonl":  # the first rows only; counting the whole file waits for the workers
            path = self.paths[0]
            if path.name.endswith(".gz"):
                with gzip.open(path, "rb") as handle:
                    block = next(decode.blocks(handle), b"")
            else:
                block = read_range(str(path), 0, decode.RANGE_BYTES)
            rows = decode_task(JsonlBlock(block, 0, 1, ""), None)
        else:
            rows = next(self.batches(None, batch_rows=_PEEK_ROWS), [])
        keys: dict[str, None] = {}
        for _, row in rows[:_PEEK_ROWS]:
            if isinstance(row, dict):
                keys.update(dict.fromkeys(row))
        return list(keys)

    def count_rows(self, mapper: Callable | None = None) -> int:
        """Rows in the input: parquet/arrow from metadata; jsonl by one scan of every byte range, which
        ``mapper(count_range, ranges)`` (a worker pool's ``map``) may spread over processes."""
        if self._num_rows is None:
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                self._num_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in self.paths)
            elif self.kind == "arrow":
                import pyarrow as pa

                # A memory map reads only the message headers here; the bodies are never touched.
                self._num_rows = sum(pa.ipc.open_stream(pa.memory_map(str(p))).read_all().num_rows
                                     for p in self.paths)
            elif self.kind == "jsonl":
                ranges = self._ranges()
                counts = list((mapper or map)(count_range, ranges))
                # Kept: the reading pass cuts the same ranges and needs each one's first row and line number.
                self._range_counts = list(zip(ranges, counts))
                self._num_rows = sum(rows for rows, _ in counts)
            else:
                self._num_rows = sum(len(decode_task(t, None)) for t in self.tasks(None))
        return self._num_rows

    def _ranges(self) -> list[FileRange]:
        """4 MB byte ranges of plain files; a .gz file is one range."""
        out = []
        for path in self.paths:
            if path.name.endswith(".gz"):
                out.append(FileRange(str(path), 0, -1, True))
                continue
            size = path.stat().st_size
            step = decode.RANGE_BYTES
            out.extend(FileRange(str(path), a, min(a + step, size), False) for a in range(0, size, step))
        return out

    # -- reading --------------------------------------------------------------------------------------------

    def batches(self, columns: list[str] | None, batch_rows: int = 1024) -> Iterator[list[tuple[int, object]]]:
        """Decoded rows, in order (in this process)."""
        for task in self.tasks(columns, batch_rows):
            yield decode_task(task, columns)

    def tasks(self, columns: list[str] | None, batch_rows: int = 1024) -> Iterator[Task]:
        """Cheap, picklable units of work in input order; ``decode_task`` turns one into rows (in a worker)."""
        reader = {"jsonl": self._jsonl_tasks, "json-array": self._json_array_tasks, "parquet": self._parquet_tasks,
                  "arrow": self._arrow_tasks, "hub": self._hub_tasks}[self.kind]
        yield from reader(columns, batch_rows)

    def _jsonl_tasks(self, columns, batch_rows):
        if self._range_counts is None:
            self.count_rows()
        index, line_no, last_path = 0, 1, None
        for (path, start, end, gz), (rows, lines) in self._range_counts:
            if path != last_path:
                line_no, last_path = 1, path
            label = Path(path).name if len(self.paths) > 1 else ""
            if gz:  # cannot seek: this process reads and ships the blocks
                yield from decode.gzip_blocks(path, index, label)
            else:
                yield JsonlRange(path, start, end, index, line_no, label)
            index += rows
            line_no += lines

    def _json_array_tasks(self, columns, batch_rows):
        index = 0
        for path in self.paths:
            rows = _load_json_array(path)
            for start in range(0, len(rows), batch_rows):
                chunk = rows[start:start + batch_rows]
                yield RowList(chunk, index)
                index += len(chunk)

    def _parquet_tasks(self, columns, batch_rows):
        import pyarrow.parquet as pq

        index = 0
        for path in self.paths:
            meta = pq.ParquetFile(path).metadata
            for group in range(meta.num_row_groups):
                yield ParquetGroup(str(path), group, index, batch_rows)
                index += meta.row_group(group).num_rows

    def _arrow_tasks(self, columns, batch_rows):
        import pyarrow as pa

        index = 0
        for path in self.paths:
            with pa.OSFile(str(path)) as handle:
                reader = pa.ipc.open_stream(handle)
                names = reader.schema.names
                wanted = [c for c in columns if c in names] if columns is not None else names
                for record_batch in reader:
                    record_batch = record_batch.select(wanted)
                    for start in range(0, record_batch.num_rows, batch_rows):
                        part = record_batch.slice(start, batch_rows)
                        yield ArrowBatch(part, index)
                        index += part.num_rows

    def _hub_tasks(self, columns, batch_rows):
        index = 0
        dataset = self._hub
        if columns is not None and self.columns is not None:
            dataset = dataset.select_columns([c for c in columns if c in self.columns])
        for chunk in dataset.iter(batch_size=batch_rows):
            keys = list(chunk)
            n = len(chunk[keys[0]]) if keys else 0
            yield RowList([{k: chunk[k][i] for k in keys} for i in range(n)], index)
            index += n


def _load_json_array(path: Path) -> list:
    with open_binary(path) as handle:
        try:
            data = json.load(io.TextIOWrapper(handle, encoding="utf-8"))
        except ValueError as err:
            raise UserError(f"{path}: not valid JSON ({str(err).split(':')[0]})") from None
    if isinstance(data, dict):
        for key in ("data", "rows", "train"):
            if isinstance(data.get(key), list):
                return data[key]
        raise UserError(f"{path}: a JSON object without a list of rows under 'data', 'rows' or 'train'")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected JSON lines or a JSON list of rows")
    return data


def _json_kind(path: Path) -> str:
    """'json-array' for a file whose first non-space byte is '[', else 'jsonl'."""
    with open_binary(path) as handle:
        while True:
            chunk = handle.read(4096)
            if not chunk:
                return "jsonl"
            stripped = chunk.lstrip()
            if stripped:
                return "json-array" if stripped[:1] == b"[" else "jsonl"


def _is_json(path: Path) -> bool:
    return path.name.endswith(_JSON_SUFFIXES)


def _split_files(files: list[Path], root: Path, split: str) -> list[Path]:
    # The hub convention (data/train-00000-of-00004.parquet, train/..., train.jsonl): keep the split's files
    # when the names say which split they are; otherwise every file is the split.
    def in_split(p: Path) -> bool:
        parts = p.relative_to(root).parts
        stem = parts[-1].split(".")[0]
        return split in parts[:-1] or stem == split or stem.startswith((f"{split}-", f"{split}_"))

    chosen = [p for p in files if in_split(p)]
    return chosen or files


def open_source(spec: str, split: str = "train") -> InputSource:
    """Resolve what the user passed (file, folder or hub name) to a reader; UserError if it cannot be read."""
    path = Path(spec).expanduser()
    if path.is_file():
        return _file_source(spec, [path])
    if path.is_dir():
        return _dir_source(spec, path, split)
    locate(spec, "dataset", "input")  # fails at once for a missing local-looking path or an unusable hub
    return _hub_source(spec, split)


def _file_source(spec: str, paths: list[Path]) -> InputSource:
    first = paths[0]
    size = sum(p.stat().st_size for p in paths)
    if first.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            columns = pq.ParquetFile(first).schema_arrow.names
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise UserError(f"{first}: not a readable parquet file ({err})") from None
        return InputSource(spec, "parquet", paths, columns, size)
    if _is_json(first):
        kinds = {_json_kind(p) for p in paths}
        return InputSource(spec, "json-array" if kinds == {"json-array"} else "jsonl", paths, None, size)
    if first.suffix == ".arrow":
        return _arrow_source(spec, paths)
    raise UserError(f"{first}: unknown input format (expected .jsonl, .json, .parquet, .arrow or a folder)")


def _arrow_source(spec: str, paths: list[Path]) -> InputSource:
    import pyarrow as pa

    try:
        with pa.OSFile(str(paths[0])) as handle:
            columns = pa.ipc.open_stream(handle).schema.names
    except Exception as err:
        raise UserError(f"{paths[0]}: not a readable arrow stream file ({err})") from None
    return InputSource(spec, "arrow", paths, columns, sum(p.stat().st_size for p in paths))


def _dir_source(spec: str, path: Path, split: str) -> InputSource:
    if (path / "dataset_dict.json").exists():  # DatasetDict.save_to_disk
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise UserError(f"{spec}: no split '{split}' (splits: {', '.join(splits)}); pass --split")
        return _dir_source(spec, path / split, split)
    if (path / "state.json").exists():  # Dataset.save_to_disk
        state = json.loads((path / "state.json").read_text())
        files = [path / f["filename"] for f in state.get("_data_files", [])]
        if not files:
            raise UserError(f"{spec}: state.json lists no data files")
        return _arrow_source(spec, files)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                            p.relative_to(path).parts))
    parquet = [p for p in files if p.suffix == ".parquet"]
    jsons = [p for p in files if _is_json(p) and p.name not in ("dataset_info.json", "dataset_infos.json")]
    if parquet and jsons:
        raise UserError(f"{spec}: holds both parquet and json files; pass one file or a folder of one kind")
    if not (parquet or jsons):
        raise UserError(f"{spec}: no .parquet, .jsonl or save_to_disk data in this folder")
    return _file_source(spec, _split_files(parquet or jsons, path, split))


def _hub_source(spec: str, split: str) -> InputSource:
    try:
        import datasets

        dataset = datasets.load_dataset(spec, split=split, streaming=True)
    except Exception as err:  # offline, unknown name, missing split: all the user's to fix
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot open hub dataset {spec} (split {split}): {message}") from None
    features = getattr(dataset, "features", None)
    source = InputSource(spec, "hub", [], list(features) if features else None, None, _hub=dataset)
    splits = getattr(getattr(dataset, "info", None), "splits", None) or {}
    if split in splits and getattr(splits[split], "num_examples", None):
        source._num_rows = splits[split].num_examples
        source.size_bytes = getattr(splits[split], "num_bytes", None)
    return source
