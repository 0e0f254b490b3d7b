"""Optional filters of `redi data pair`: benchmark decontamination, the chat-template length filter, and the
length histograms of the report.

Decontamination follows the authors' ``decontaminate.py`` (spec §4.2 item 7): text lower-cased, stripped and
whitespace-normalised, word 8-grams, a row is contaminated when any of its problem's n-grams appears in any
benchmark problem. The authors only reported; we drop and report.

The length filter follows ``study_length_distribution.py`` (spec §4.4): prompt = tokens of the chat template
applied to ``[user]`` without a generation prompt, + 1; each response = tokens of the template applied to
``[assistant]`` alone, + 1 for EOS. For Qwen templates that count includes the injected system block, which
slightly overestimates a response: that is the paper's measure, kept on purpose.
"""
from __future__ import annotations

import json
import os
from bisect import bisect_right
from contextlib import contextmanager
from pathlib import Path

from redi.errors import UserError

_TEXT_FIELDS = ("problem", "question", "prompt", "Problem", "Question")


# ----------------------------------------------------------------------------------------- decontamination


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().split())


def word_ngrams(text: str, n: int) -> list[str]:
    words = normalize(text).split()
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def _problem_text(row, where: str) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with a problem field, got {type(row).__name__}")
    for key in _TEXT_FIELDS:
        value = row.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # a conversational prompt: the user turn is the problem
            for message in value:
                if isinstance(message, dict) and message.get("role") == "user":
                    return str(message.get("content", ""))
    raise UserError(f"{where}: no text field (one of {', '.join(_TEXT_FIELDS)})")


def load_benchmark_problems(path: str) -> list[str]:
    """Problems of one benchmark file: .json (a list, or {'data': [...]}), .jsonl or .parquet."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--decontaminate file not found: {path}")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
    elif p.suffix in (".json", ".jsonl"):
        text = p.read_text(encoding="utf-8")
        if text.lstrip().startswith(("[", "{")) and p.suffix == ".json":
            try:
                data = json.loads(text)
            except ValueError:
                data = None
            if isinstance(data, dict):
                data = data.get("data", data.get("rows", [data]))
            rows = data if isinstance(data, list) else None
        else:
            rows = None
        if rows is None:
            rows = []
            for line_no, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        raise UserError(f"{path} line {line_no}: not JSON") from None
    else:
        raise UserError(f"--decontaminate {path}: expected a .json, .jsonl or .parquet file")
    return [_problem_text(row, f"{path} row {i}") for i, row in enumerate(rows, start=1)]


class Decontaminator:
    """Which benchmark file, if any, shares a word n-gram with a problem."""

    def __init__(self, files: list[str], ngram_size: int = 8):
        self.ngram_size = ngram_size
        self.files = [str(f) for f in files]
        self._owner: dict[str, str] = {}
        for path in self.files:
            problems = load_benchmark_problems(path)
            for problem in problems:
                for gram in word_ngrams(problem, ngram_size):
                    self._owner.setdefault(gram, path)

    def match(self, problem: str) -> tuple[str, str] | None:
        """(benchmark file, shared n-gram) for the first shared n-gram in reading order, else None."""
        for gram in word_ngrams(problem, self.ngram_size):
            owner = self._owner.get(gram)
            if owner is not None:
                return owner, gram
        return None


# ------------------------------------------------------------------------------------------- length filter


@contextmanager
def _rust_threads():
    # The CLI turns tokenizers' thread pool off (it would misbehave in forked workers); batch encoding here
    # runs in this process only, so let it use every core for the duration of the call.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


class LengthMeter:
    """Token lengths measured as the authors did, in batches."""

    def __init__(self, tokenizer_path: str, parallel: bool = True):
        self.parallel = parallel
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except Exception as err:
            from redi.model_dir import tokenizer_error

            raise UserError(tokenizer_error(tokenizer_path, err)) from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"tokenizer {tokenizer_path} has no chat_template; the length filter measures with it")
        rust = getattr(self.tokenizer, "backend_tokenizer", None)  # the tokenizers-library object, when fast
        self._encode_batch = getattr(rust, "encode_batch_fast", None) or getattr(rust, "encode_batch", None)

    def _render(self, conversations: list[list[dict]]) -> list[str]:
        texts = self.tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=False)
        return [texts] if isinstance(texts, str) else list(texts)

    def count(self, texts: list[str]) -> list[int]:
        """Token counts of already-rendered texts, without special tokens added (as apply_chat_template)."""
        if not texts:
            return []
        if self._encode_batch is not None:
            if not self.parallel:
                return [len(enc) for enc in self._encode_batch(texts, add_special_tokens=False)]
            with _rust_threads():
                return [len(enc) for enc in self._encode_batch(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def prompt_lengths(self, problems: list[str]) -> list[int]:
        texts = self._render([[{"role": "user", "content": p}] for p in problems])
        return [n + 1 for n in self.count(texts)]

    def response_lengths(self, responses: list[str]) -> list[int]:
        texts = self._render([[{"role": "assistant", "content": r}] for r in responses])
        return [n + 1 for n in self.count(texts)]


# ----------------------------------------------------------------------------------------------- histograms

# Power-of-two bins from 128 up: the same edges for tokens and characters keep reports comparable.
EDGES = [0] + [1 << k for k in range(7, 21)]


class Histogram:
    def __init__(self, unit: str):
        self.unit = unit
        self.counts = [0] * len(EDGES)
        self.n = 0
        self.total = 0
        self.max = 0
        self.min: int | None = None

    def add(self, value: int) -> None:
        self.counts[bisect_right(EDGES, value) - 1] += 1
        self.n += 1
        self.total += value
        self.max = max(self.max, value)
        self.min = value if self.min is None else min(self.min, value)

    def merge(self, other: "Histogram") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.n += other.n
        self.total += other.total
        self.max = max(self.max, other.max)
        if other.min is not None:
            self.min = other.min if self.min is None else min(self.min, other.min)

    def to_dict(self) -> dict:
        bins = [{"from": EDGES[i], "to": EDGES[i + 1] if i + 1 < len(EDGES) else None, "count": c}
                for i, c in enumerate(self.counts) if c]
        return {"unit": self.unit, "count": self.n, "min": self.min, "max": self.max if self.n else None,
                "mean": round(self.total / self.n, 1) if self.n else None, "bins": bins}
