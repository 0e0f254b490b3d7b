"""Training rows in, token ids out: SFT rows (prompt/completion or messages) and pairs (prompt/chosen/rejected).

Sources: jsonl, parquet, a ``datasets`` save_to_disk folder, a hub name, or a folder written by
``redi data pair`` (``sft.*`` and ``pairs.*``). Values may be plain strings or conversational message lists
(TRL's formats). Conversational rows go through the tokenizer's chat template; the prompt is masked and EOS
is appended once. The completion length L counts exactly the tokens that will be scored (after truncation).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from redi.errors import UserError
from redi.hub import locate

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


@dataclass
class TokenizedSeq:
    prompt: np.ndarray  # int32 ids, masked out of the loss
    completion: np.ndarray  # int32 ids, scored (EOS included)
    row: int = -1

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.completion)


@dataclass
class TokenizedPair:
    chosen: TokenizedSeq
    rejected: TokenizedSeq
    row: int = -1

    @property
    def length(self) -> int:
        return max(self.chosen.length, self.rejected.length)


@dataclass
class DataReport:
    source: str
    kind: str
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    malformed: list[str] = field(default_factory=list)
    suspicious: dict[str, int] = field(default_factory=dict)  # kept rows worth a warning (empty_prompt, ...)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def flag(self, reason: str) -> None:
        self.suspicious[reason] = self.suspicious.get(reason, 0) + 1

    def to_dict(self) -> dict:
        return {
            "source": self.source, "kind": self.kind, "rows": self.rows, "kept": self.kept,
            "truncated": self.truncated, "dropped": self.dropped, "suspicious": self.suspicious,
            "malformed": self.malformed[:100],
        }


# ----------------------------------------------------------------------------- reading rows


def resolve_sources(data: str, stage: str) -> Path | str:
    """Map the ``data`` setting to the file (or hub name) holding this stage's rows."""
    want = "sft" if stage == "sft" else "pairs"
    p = Path(data)
    if p.is_dir() and not (p / "dataset_info.json").exists() and not (p / "state.json").exists():
        for suffix in DATA_SUFFIXES:
            if (p / f"{want}{suffix}").exists():
                return p / f"{want}{suffix}"
        if want == "sft":
            for suffix in DATA_SUFFIXES:
                if (p / f"pairs{suffix}").exists():
                    return p / f"pairs{suffix}"  # SFT on the chosen traces when no sft file exists
        raise UserError(f"data folder {p} has no {want}.parquet or {want}.jsonl")
    found = locate(data, "dataset", "data path")
    if isinstance(found, Path) and found.suffix == ".parquet":
        _parquet_file(found)  # a 0-byte or cut file is named now, before a run folder is made
    return found


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({' '.join(str(err).split())})") from None


def _is_json_file(source) -> bool:
    return isinstance(source, Path) and source.name.endswith(JSON_SUFFIXES) and source.is_file()


def iter_rows(source: Path | str) -> Iterator[tuple[int, Any]]:
    """Yield (row number, row) from any supported source; a bad JSON line yields (n, ValueError)."""
    if _is_json_file(source):
        import gzip

        opener = gzip.open if source.suffix == ".gz" else open  # .jsonl.gz, as `redi data pair` reads it
        with opener(source, "rb") as fh:  # bytes, so one bad byte is one malformed row, not a crash
            for n, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield n, ValueError(f"not UTF-8 (byte {err.start + 1} of the line)")
                    continue
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as err:
                    yield n, ValueError(f"not valid JSON ({err.msg})")
        return
    if isinstance(source, Path) and source.suffix == ".parquet":
        import pyarrow as pa

        n = 0
        try:
            for batch in _parquet_file(source).iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    n += 1
                    yield n, row
        except (OSError, ValueError, pa.ArrowException) as err:  # a page damaged after the footer
            raise UserError(f"{source}: cannot read the parquet rows after row {n} "
                            f"({' '.join(str(err).split())})") from None
        return
    import datasets

    try:
        if isinstance(source, Path):
            ds = datasets.load_from_disk(str(source))
        else:
            ds = datasets.load_dataset(source, split="train")
    except Exception as err:  # datasets raises many types for a bad path or an unreachable hub
        raise UserError(f"cannot read data from {source}: {type(err).__name__}: {err}".splitlines()[0]) from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    for n, row in enumerate(ds, start=1):
        yield n, row


# ----------------------------------------------------------------------------- row shapes


def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)


def _check_text(value: Any, key: str) -> Any:
    if isinstance(value, str) or _is_messages(value):
        if key != "prompt" and (value == "" or value == [] or (_is_messages(value) and value[-1]["content"] == "")):
            raise ValueError(f"empty '{key}'")
        return value
    raise ValueError(f"'{key}' must be a string or a list of {{role, content}} messages")


def _split_conversation(prompt: Any, completion: Any) -> tuple[Any, Any]:
    """Return (prompt messages or str, assistant messages or str); strips a repeated prompt prefix."""
    if _is_messages(completion):
        if isinstance(prompt, str) and len(completion) > 1:
            # The paper's stored pairs: prompt is the raw problem, chosen/rejected hold [user, assistant].
            return completion[:-1], completion[-1:]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if _is_messages(prompt) and completion[: len(prompt)] == prompt and len(completion) > len(prompt):
            completion = completion[len(prompt):]
        return prompt, completion
    if _is_messages(prompt):
        return prompt, [{"role": "assistant", "content": completion}]
    return prompt, completion


def sft_fields(row: dict) -> tuple[Any, Any]:
    if "messages" in row and row["messages"] is not None:
        msgs = _check_text(row["messages"], "messages")
        if isinstance(msgs, str) or not msgs or msgs[-1]["role"] != "assistant":
            raise ValueError("'messages' must end with an assistant message")
        return msgs[:-1], msgs[-1:]
    for key in ("prompt", "completion"):
        if key not in row or row[key] is None:
            raise ValueError(f"missing key '{key}' (SFT rows need prompt/completion or messages)")
    return _split_conversation(_check_text(row["prompt"], "prompt"), _check_text(row["completion"], "completion"))


def pair_fields(row: dict) -> tuple[Any, Any, Any]:
    for key in ("prompt", "chosen", "rejected"):
        if key not in row or row[key] is None:
            raise ValueError(f"missing key '{key}' (pair rows need prompt, chosen, rejected)")
    prompt = _check_text(row["prompt"], "prompt")
    p1, chosen = _split_conversation(prompt, _check_text(row["chosen"], "chosen"))
    p2, rejected = _split_conversation(prompt, _check_text(row["rejected"], "rejected"))
    if p1 != p2:
        raise ValueError("chosen and rejected carry different prompts")
    return p1, chosen, rejected


# ----------------------------------------------------------------------------- tokenizing


class Encoder:
    """Turns (prompt, completion) into token ids the way TRL does (redi-spec.md §2.2, §4.4)."""

    def __init__(self, tokenizer: Any, system_prompt: str = "", source: str = "tokenizer"):
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.source = source
        self.eos = tokenizer.eos_token_id
        self.ignored_system_prompt = False  # set once string rows met a system_prompt (warned once)
        if self.eos is None:
            raise UserError(f"tokenizer at {source} has no eos_token; set one in tokenizer_config.json")

    def _template(self, messages: list[dict], generation_prompt: bool) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise UserError(
                f"conversational data needs a chat template, but the tokenizer at {self.source} has none"
            )
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def texts(self, prompt: Any, completion: Any) -> tuple[str, str]:
        if isinstance(prompt, str) and isinstance(completion, str):
            if self.system_prompt and not self.ignored_system_prompt:
                self.ignored_system_prompt = True
                print("warning: system_prompt is set but the rows are plain strings, which skip the chat "
                      "template: it is ignored (use message rows to get it; see docs/train.md's data formats)",
                      file=sys.stderr)
            return prompt, completion
        msgs = list(prompt)
        if self.system_prompt and msgs and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.system_prompt}] + msgs
        prompt_text = self._template(msgs, True)
        full = self._template(msgs + list(completion), False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template is not prefix-stable: prompt + completion does not start with prompt")
        return prompt_text, full[len(prompt_text):]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def finish(self, prompt_ids: list[int], completion_ids: list[int], row: int) -> TokenizedSeq:
        if not completion_ids or completion_ids[-1] != self.eos:
            completion_ids = list(completion_ids) + [self.eos]
        return TokenizedSeq(np.asarray(prompt_ids, np.int32), np.asarray(completion_ids, np.int32), row)


# ----------------------------------------------------------------------------- loading a stage's examples


def _malformed(report: DataReport, n: int, why: str, on_malformed: str) -> None:
    where = f"{report.source} row {n}: {why}"
    if on_malformed == "error":
        raise UserError(where)
    report.malformed.append(where)
    report.drop("malformed")


def _chunks(rows: Iterator[tuple[int, Any]], size: int = 512) -> Iterator[list[tuple[int, Any]]]:
    buf: list[tuple[int, Any]] = []
    for item in rows:
        buf.append(item)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def _parse_chunk(chunk: list[tuple[int, Any]], report: DataReport, on_malformed: str, parse) -> list[tuple]:
    """(row number, *parse(row)) for the well-formed rows; the others are counted, listed or refused."""
    parsed = []
    for n, row in chunk:
        report.rows += 1
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise ValueError("row is not a JSON object")
            parsed.append((n, *parse(row)))
        except ValueError as err:
            _malformed(report, n, str(err), on_malformed)
    return parsed


def _check_tokenizer_covers(report: DataReport, encoder: Encoder) -> None:
    """Most rows turning into no tokens means the tokenizer cannot read this text: stop, naming it."""
    empty = report.dropped.get("no_completion_tokens", 0)
    if empty and empty * 2 > report.rows:
        raise UserError(
            f"the tokenizer at {encoder.source} turns {empty} of {report.rows} rows of {report.source} into no "
            f"completion tokens: its vocabulary does not cover this text (transformers loads any tokenizer beside "
            f"a qwen2 config as Qwen2Tokenizer); use the model's own tokenizer"
        )


def _finish_report(out: list, report: DataReport, encoder: Encoder) -> tuple[list, DataReport]:
    report.kept = len(out)
    _check_tokenizer_covers(report, encoder)
    return out, report


def load_sft(source: Path | str, encoder: Encoder, max_length: int, on_malformed: str = "error"
             ) -> tuple[list[TokenizedSeq], DataReport]:
    """SFT examples; rows longer than max_length are right-truncated (and counted), as the authors did."""
    report = DataReport(str(source), "sft")
    out: list[TokenizedSeq] = []
    pair_file = Path(str(source)).name.startswith("pairs.")
    fields = (lambda row: pair_fields(row)[:2]) if pair_file else sft_fields
    for chunk in _chunks(iter_rows(source)):
        texts = _parse_chunk(chunk, report, on_malformed, lambda row: encoder.texts(*fields(row)))
        prompts = encoder.encode_many([t[1] for t in texts])
        completions = encoder.encode_many([t[2] for t in texts])
        for (n, _, _), p_ids, c_ids in zip(texts, prompts, completions):
            if not c_ids:
                report.drop("no_completion_tokens")
                continue
            if not p_ids:
                report.flag("empty_prompt")
            seq = encoder.finish(p_ids, c_ids, n)
            if len(seq.prompt) >= max_length:
                report.drop("prompt_too_long")
                continue
            if seq.length > max_length:
                seq.completion = seq.completion[: max_length - len(seq.prompt)]
                report.truncated += 1
            out.append(seq)
    return _finish_report(out, report, encoder)


def load_pairs(source: Path | str, encoder: Encoder, max_length: int, max_prompt_length: int = 0,
               on_malformed: str = "error") -> tuple[list[TokenizedPair], DataReport]:
    """Pair examples; a pair whose prompt + either response exceeds max_length is dropped, never truncated."""
    report = DataReport(str(source), "pairs")
    out: list[TokenizedPair] = []
    def pair_texts(row: dict) -> tuple[str, str, str]:
        prompt, chosen, rejected = pair_fields(row)
        p_text, c_text = encoder.texts(prompt, chosen)
        return p_text, c_text, encoder.texts(prompt, rejected)[1]

    for chunk in _chunks(iter_rows(source)):
        texts = _parse_chunk(chunk, report, on_malformed, pair_texts)
        prompts = encoder.encode_many([t[1] for t in texts])
        chosens = encoder.encode_many([t[2] for t in texts])
        rejecteds = encoder.encode_many([t[3] for t in texts])
        for (n, _, c_text, r_text), p_ids, c_ids, r_ids in zip(texts, prompts, chosens, rejecteds):
            if not c_ids or not r_ids:
                report.drop("no_completion_tokens")
                continue
            pair = TokenizedPair(encoder.finish(p_ids, c_ids, n), encoder.finish(p_ids, r_ids, n), n)
            if not p_ids:
                report.flag("empty_prompt")
            if c_text == r_text:
                report.flag("chosen_equals_rejected")
            if max_prompt_length and len(pair.chosen.prompt) > max_prompt_length:
                report.drop("prompt_too_long")
            elif pair.length > max_length:
                report.drop("too_long")
            else:
                out.append(pair)
    return _finish_report(out, report, encoder)
