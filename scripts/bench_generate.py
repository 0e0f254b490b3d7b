"""Throughput of `redi data generate`: traces/s and generated tokens/s per engine, same problems and sampling,
in one run.

    python scripts/bench_generate.py --demo                          # CPU: the demo's stage-1 teacher, 20 problems
    python scripts/bench_generate.py --demo --engines native,vllm    # both engines (vLLM venv)
    python scripts/bench_generate.py --shape qwen2.5-1.5b --backend cuda --problems 64 --samples 4 \\
        --max-new-tokens 1024 --batch-size 256                       # GPU: a random 1.5B-shape model

Each engine is started once (its start is timed apart), runs one warm-up chunk into a scratch folder, then
generates the whole set through ``generate_traces`` into a fresh folder; the numbers are that run's
``this_run`` (engine time only: labelling and writing excluded). A random model rarely emits EOS, so its
traces run to --max-new-tokens: decode throughput at full length.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT / "scripts"))
from bench_eval import SHAPES  # noqa: E402  (the eval benchmark's shapes: one list of model shapes)
from bench_args import add_defaults  # noqa: E402


def random_model(shape: str, out: Path) -> Path:
    """A random-init Qwen2 of ``shape`` with the local character tokenizer (as scripts/bench_eval.py)."""
    from redi.tiny import build_model

    return Path(build_model(out, shape=SHAPES[shape], seed=0))


def synthetic_problems(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"id": i, "problem": f"What is {i} + {2 * i + 1}?", "answer": str(3 * i + 1)})
                            + "\n" for i in range(count)))
    return path


def bench_engine(name: str, teacher: Path, problems: Path, args, scratch: Path) -> dict:
    from redi.evaluation.engines import make_engine
    from redi.pairing.generate import GenerateSettings, generate_traces
    from redi.training.api import load_tokenizer

    settings = GenerateSettings(samples=args.samples, temperature=args.temperature, top_p=0.95,
                                max_new_tokens=args.max_new_tokens, engine=name, backend=args.backend,
                                chunk_problems=args.chunk_problems, workers=0, **args.prompting)
    started = time.perf_counter()
    engine = make_engine(name, str(teacher), backend=args.backend, tokenizer=load_tokenizer(str(teacher)),
                         batch_size=args.batch_size)
    start_s = time.perf_counter() - started
    warm = GenerateSettings(**{**settings.__dict__, "limit": min(args.chunk_problems, 4),
                               "max_new_tokens": min(64, args.max_new_tokens)})
    generate_traces(str(teacher), str(problems), scratch / f"warmup-{name}", warm, engine=engine)
    result = generate_traces(str(teacher), str(problems), scratch / f"run-{name}", settings, engine=engine)
    run = result.report["this_run"]
    return {"engine": name, "engine_start_s": round(start_s, 1), **run,
            "mean_trace_tokens": round(result.report["mean_trace_tokens"], 1),
            "truncation_rate": result.report["truncation_rate"], "correct_traces": result.report["correct_traces"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--demo", action="store_true", help="the demo's stage-1 teacher (trained here, ~1 min on 2 cores)")
    what.add_argument("--shape", choices=sorted(SHAPES), help="a random-init model of this shape")
    what.add_argument("--teacher", help="an existing model folder (with --problems-file)")
    p.add_argument("--problems-file", help="problems for --teacher")
    p.add_argument("--problems", type=int, default=64, help="synthetic problems for --shape")
    add_defaults(p, engines="native", backend="cpu", samples=4, max_new_tokens=48, temperature=0.6, chunk_problems=64)
    p.add_argument("--batch-size", type=int, default=64, help="the native engine's concurrent rows")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    args.prompting = {}
    if args.demo:
        sys.path.insert(0, str(ROOT / "tests"))
        from generate_chain import train_demo_teacher

        t0 = time.perf_counter()
        teacher, problems = train_demo_teacher(scratch)
        print(f"demo teacher trained in {time.perf_counter() - t0:.0f} s")
        args.prompting = {"instruction": "{problem}", "chat_template": False, "force_think": False,
                          "id_field": "uid"}
    elif args.shape:
        teacher = random_model(args.shape, scratch / args.shape)
        problems = synthetic_problems(scratch / "problems.jsonl", args.problems)
    else:
        if not args.problems_file:
            p.error("--teacher needs --problems-file")
        teacher, problems = Path(args.teacher), Path(args.problems_file)

    rows = [bench_engine(name, teacher, problems, args, scratch) for name in args.engines.split(",")]
    cols = ("engine", "engine_start_s", "problems_generated", "traces_generated", "tokens_generated",
            "generation_seconds", "traces_per_second", "tokens_per_second", "mean_trace_tokens", "truncation_rate")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
