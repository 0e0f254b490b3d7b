"""Throughput and memory of `redi data pair` on a synthetic OpenR1-Math-Raw-shaped file.

    python scripts/bench_data_pair.py                      # 200k rows, jsonl, with and without a tokenizer
    python scripts/bench_data_pair.py --format parquet --gen-chars 10000 --no-tokenizer

Rows look like OpenR1-Math-Raw: problem, answer, source (some cn_k12), problem_is_valid (Yes/yes/No...),
1-4 generations (mean ~2.3, as the raw set), the nested ``correctness`` struct with the three label lists
(some nulls), uuid, plus the unused columns (solution, reparsed_answers...). Text is random LaTeX-ish words.
Each run is a fresh CLI process; peak RSS (summed) and CPU seconds cover it and all its worker processes.
On a shared machine wall-clock rows/s moves with the load; rows per CPU second does much less.
With ``--tokenizer`` absent, a byte-level BPE with a Qwen-like ChatML template (system block injected) is
trained locally for the length-filter run; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_WORDS = ("the of and to a in is that for it as with we let so then thus hence x y z n k m "
          "\\frac{1}{2} $a+b=c$ \\sqrt{2} \\cdot \\le \\ge (x+1)^2 = 0 therefore wait check again").split()
QWEN_LIKE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nPlease reason step by step, and put your final "
    "answer within \\\\boxed{}.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if not "
    "(message['role'] == 'system' and loop.first) %}{{- '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _text_pool(rng: random.Random, chars: int) -> str:
    out, size = [], 0
    while size < chars:
        word = rng.choice(_WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def make_rows(n: int, gen_chars: int, seed: int = 0):
    rng = random.Random(seed)
    pool = _text_pool(rng, 4 * max(gen_chars, 4096) + 200_000)

    def text(mean: int) -> str:
        size = max(16, int(rng.expovariate(1 / mean))) if mean > 400 else mean
        start = rng.randrange(0, len(pool) - size)
        return pool[start:start + size]

    for i in range(n):
        k = rng.choices([1, 2, 3, 4], weights=[10, 60, 5, 25])[0]
        labels = lambda p: [rng.random() < p for _ in range(k)]  # noqa: E731
        yield {
            "problem": text(300), "solution": text(800), "answer": str(rng.randrange(1000)),
            "problem_type": "Algebra", "question_type": "math-word-problem",
            "problem_is_valid": rng.choice(["Yes", "Yes", "yes", " Yes ", "No", "Incomplete"]),
            "solution_is_valid": "Yes",
            "source": rng.choice(["olympiads", "olympiads", "amc_aime", "aops_forum", "cn_k12", "inequalities"]),
            "synthetic": False,
            "generations": ["<think>\n" + text(gen_chars) + "\n</think>\n\\boxed{1}" for _ in range(k)],
            "generations_count": k,
            "correctness": {
                "llama_verification": [None if rng.random() < 0.02 else v for v in labels(0.7)],
                "math_verify_answer": [None if rng.random() < 0.1 else v for v in labels(0.6)],
                "math_verify_reparsed_answer": labels(0.65),
            },
            "reparsed_answers": [None] * k,
            "uuid": f"{i:08x}-synthetic",
        }


def write_input(path: Path, n: int, gen_chars: int, fmt: str) -> None:
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as handle:
            for row in make_rows(n, gen_chars):
                handle.write(json.dumps(row))
                handle.write("\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _raw_schema(pa)
    with pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=False) as writer:
        batch = []
        for row in make_rows(n, gen_chars):
            batch.append(row)
            if len(batch) == 2000:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


def _raw_schema(pa):
    flags = pa.list_(pa.bool_())
    return pa.schema([
        ("problem", pa.string()), ("solution", pa.string()), ("answer", pa.string()),
        ("problem_type", pa.string()), ("question_type", pa.string()), ("problem_is_valid", pa.string()),
        ("solution_is_valid", pa.string()), ("source", pa.string()), ("synthetic", pa.bool_()),
        ("generations", pa.list_(pa.string())), ("generations_count", pa.int64()),
        ("correctness", pa.struct([("llama_verification", flags), ("math_verify_answer", flags),
                                   ("math_verify_reparsed_answer", flags)])),
        ("reparsed_answers", pa.list_(pa.string())), ("uuid", pa.string()),
    ])


def build_tokenizer(folder: Path) -> Path:
    """A byte-level BPE (4k merges) with a Qwen-like chat template, trained on the synthetic words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(1)
    tok.train_from_iterator([_text_pool(rng, 2000) for _ in range(500)], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": QWEN_LIKE_TEMPLATE}))
    return folder


class TreeSampler:
    """Samples a process and its descendants from /proc every 50 ms: peak summed RSS, CPU seconds used.

    Workers of a pool are grandchildren (forkserver), so getrusage of the child alone would miss them.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_rss = 0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = 0
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/stat") as handle:
                        fields = handle.read().rsplit(")", 1)[1].split()
                    self.cpu[pid] = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
                    rss += int(fields[21]) * self._page
                except (OSError, IndexError, ValueError):
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(0.05)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_once(input_path: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "redi", "data", "pair", str(input_path), "--output", str(out), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with TreeSampler(proc.pid) as sampler:
        _, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"redi data pair failed ({proc.returncode}):\n{stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"seconds": seconds, "peak_rss_mib": sampler.peak_rss / 2**20, "cpu_s": sum(sampler.cpu.values()),
            "rows": report["rows_read"], "sft": report["sft_rows"], "pairs": report["pairs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--gen-chars", type=int, default=3000, help="mean characters per generation")
    parser.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    parser.add_argument("--tokenizer", help="tokenizer folder for the length-filter run (default: a local BPE)")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip the length-filter run")
    parser.add_argument("--workdir", help="keep the input and outputs here (default: a temporary folder)")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    work = Path(args.workdir or tempfile.mkdtemp(prefix="redi-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    input_path = work / f"openr1_raw_synthetic_{args.rows}.{args.format}"
    if not input_path.exists():
        start = time.perf_counter()
        partial = input_path.with_name(input_path.name + ".partial")
        write_input(partial, args.rows, args.gen_chars, args.format)
        partial.replace(input_path)
        print(f"wrote {input_path} ({input_path.stat().st_size / 1e6:,.0f} MB) in {time.perf_counter() - start:.0f}s")
    size_mb = input_path.stat().st_size / 1e6

    runs = [("no tokenizer", [])]
    if not args.no_tokenizer:
        tok = Path(args.tokenizer) if args.tokenizer else build_tokenizer(work / "bpe-tokenizer")
        runs.append(("length filter", ["--tokenizer", str(tok)]))
    load = os.getloadavg()[0]
    table = Table(title=f"redi data pair on {args.rows:,} synthetic OpenR1-Raw rows ({args.format}, {size_mb:,.0f} MB, "
                        f"{os.cpu_count()} cores, load average {load:.1f} at start)")
    for col in ("run", "wall s", "rows/s", "MB/s", "CPU s", "rows per CPU s", "peak RSS MiB", "SFT rows", "pairs"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, extra in runs:
        r = run_once(input_path, work / f"out-{name.replace(' ', '-')}", extra)
        table.add_row(name, f"{r['seconds']:.1f}", f"{r['rows'] / r['seconds']:,.0f}", f"{size_mb / r['seconds']:,.0f}",
                      f"{r['cpu_s']:.1f}", f"{r['rows'] / max(r['cpu_s'], 1e-9):,.0f}", f"{r['peak_rss_mib']:,.0f}",
                      f"{r['sft']:,}", f"{r['pairs']:,}")
    Console(width=max(Console().width, 130)).print(table)
    if not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
