"""Throughput and memory of the torch backend against TRL, on the same synthetic data, in one script.

A random-init model of a named shape (default: Qwen2.5-1.5B's), synthetic pairs from the same generator as
``trl_baseline.py`` (prompt 256 tokens, log-normal completions capped to the max length), trained through
the backend's public API (``forward_backward`` per micro-batch, ``optimizer_step``) with the project's own
losses. Per run: real (non-pad) tokens/s over forward+backward (what TRL's meter times) and over the whole
step (optimizer included), padding fraction, step time p50/p90, peak GPU memory, MFU, the layers the
planner checkpointed, the warm-up steps' times (the first ones include compiling). ``--longest`` trains
single pairs of growing length until one does not fit. ``--with-trl`` first runs TRL's trainers
(``scripts/bench_trl.py``, one process per trainer and setting: gradient checkpointing on and off,
``padding_free`` where TRL has it) on the same GPU and data, and prints each of our runs' ratio against the
fastest TRL setting of the matching trainer. Both sides time ``--steps`` steps after ``--warmup`` steps
(default 20 after 5); only a ratio measured in one run is a valid claim.

    python scripts/bench.py --tiny --with-trl             # CPU smoke run of everything, about a minute
    python scripts/bench.py --max-len 4096 --with-trl     # the GPU measurement (scripts/gpu_check.sh)
    python scripts/bench.py --tiny --lora 16              # each run again with rank-16 LoRA adapters (PEFT)
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from redi.backends.torch_cuda import layers  # noqa: E402
from redi.backends.torch_cuda.backend import TorchBackend  # noqa: E402
from redi.backends.torch_cuda.packing import pack  # noqa: E402
from redi.backend import MicroBatch  # noqa: E402
from redi.data import TokenizedSeq  # noqa: E402
from redi.training.loop import StageRun, micro_batch_loss  # noqa: E402
from redi.lora import LoraSpec  # noqa: E402
from redi.objectives import make_objective  # noqa: E402

from bench_data import EOS, SHAPES, VOCAB_WORDS, make_model, peak_gib, synthetic_pairs  # noqa: E402
from bench_trl import best_trl, ratios, run_trl  # noqa: E402

OBJECTIVES = {"redi": "redi", "simpo": "simpo", "dpo": "dpo"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seq(prompt: list[int], completion: list[int]) -> TokenizedSeq:
    return TokenizedSeq(np.asarray(prompt, dtype=np.int32), np.asarray(completion, dtype=np.int32))


def step_batches(mode: str, pairs, micro_pairs: int) -> list[MicroBatch]:
    """One optimizer step's micro-batches, length-sorted like the trainer's StepPlan."""
    order = sorted(range(len(pairs)), key=lambda k: max(len(pairs[k][0]) + len(pairs[k][1]),
                                                        len(pairs[k][0]) + len(pairs[k][2])))
    groups = [order[j:j + micro_pairs] for j in range(0, len(order), micro_pairs)]
    if mode == "sft":  # chosen and rejected as SFT rows, as trl_baseline's SFT run does
        total = sum(len(p[1]) + len(p[2]) for p in pairs)
        return [MicroBatch([seq(pairs[k][0], pairs[k][c]) for k in g for c in (1, 2)], 0,
                           sum(len(pairs[k][1]) + len(pairs[k][2]) for k in g) / total, np.asarray(g))
                for g in groups]
    return [MicroBatch([seq(pairs[k][0], pairs[k][1]) for k in g] + [seq(pairs[k][0], pairs[k][2]) for k in g],
                       len(g), len(g) / len(pairs), np.asarray(g)) for g in groups]


def stage_run(mode: str) -> StageRun:
    return StageRun(mode, None, [], None if mode == "sft" else make_objective(OBJECTIVES[mode]), 0)


def new_backend(options: dict, args, max_len: int, device: torch.device) -> TorchBackend:
    """A backend on a fresh random-init model of ``args.shape``, ready to train, peak memory counter reset."""
    rank = int(options.get("lora_rank", 0))  # stays in the result's options: no TRL ratio for LoRA runs
    backend = TorchBackend(device.type, seed=0, lora=LoraSpec(rank) if rank else None,
                           **{k: v for k, v in options.items() if k != "lora_rank"})
    backend.adopt(make_model(args.shape, max_len, device), lm_head_chunk=args.lm_head_chunk)
    backend.init_optimizer(weight_decay=0.0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return backend


def reference_logps(backend: TorchBackend, steps, micro_pairs: int, device: torch.device) -> tuple[dict, float]:
    """DPO's reference log-probs: one no-grad pass, cached, no second model held; and its seconds."""
    refs = {}
    sync(device)
    t = time.perf_counter()
    for s, pairs in enumerate(steps):
        for b in step_batches("dpo", pairs, micro_pairs):
            refs[(s, tuple(b.indices))] = backend.sequence_logps(b)[0]
    sync(device)
    return refs, time.perf_counter() - t


def run_one(name: str, mode: str, options: dict, args, data, max_len: int, device: torch.device) -> dict:
    options = dict(options)
    micro_pairs = int(options.pop("micro_pairs", args.micro_pairs))
    backend = new_backend(options, args, max_len, device)
    n_params = backend.num_parameters()
    h, _, n_layers, *_ = SHAPES[args.shape]
    run = stage_run(mode)
    steps = [data[s * args.pairs:(s + 1) * args.pairs] for s in range(args.warmup + args.steps)]
    refs, ref_s = reference_logps(backend, steps, micro_pairs, device) if mode == "dpo" else ({}, 0.0)
    fb_times, step_times, tokens, padded, flops, ckpt, warmup_times = [], [], [], [], [], [], []
    for s, pairs in enumerate(steps):
        batches = step_batches(mode, pairs, micro_pairs)
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            if mode == "dpo":
                b.ref_logps = refs[(s, tuple(b.indices))]
            backend.forward_backward(b, micro_batch_loss(run, b))
        sync(device)
        t1 = time.perf_counter()
        backend.optimizer_step(1e-6, 1.0)
        sync(device)
        t2 = time.perf_counter()
        if s < args.warmup:
            warmup_times.append(t2 - t0)
        else:
            fb_times.append(t1 - t0)
            step_times.append(t2 - t0)
            lens = [q.length for b in batches for q in b.seqs]
            tokens.append(sum(lens))
            padded.append(sum(pack(b, 0).width for b in batches))
            # LoRA: no weight gradients for the frozen base, so 4 N per token instead of 6 N (adapters ignored)
            per = 4 if options.get("lora_rank") else 6
            flops.append(sum(per * n_params * n + per * n_layers * h * n * n for n in lens))
            ckpt.append(backend.last_checkpointed_layers)
    peak = peak_gib(device)
    fb, st = sum(fb_times), sum(step_times)
    result = {
        "run": name, "mode": mode, "max_len": max_len, "options": options,
        "tokens_per_s": round(sum(tokens) / fb, 1), "tokens_per_s_with_optimizer": round(sum(tokens) / st, 1),
        "padding_fraction": round(1 - sum(tokens) / sum(padded), 4),
        "step_s_p50": round(statistics.median(step_times), 4),
        "step_s_p90": round(float(np.percentile(step_times, 90)), 4),
        "peak_gb": round(peak, 2), "mfu": round(sum(flops) / fb / (args.peak_tflops * 1e12), 4),
        "checkpointed_layers": max(ckpt), "timed_tokens": int(sum(tokens)), "reference_pass_s": round(ref_s, 3),
        "micro_pairs": micro_pairs, "timed_steps": len(step_times), "warmup_steps": args.warmup,
        "warmup_step_s": [round(t, 3) for t in warmup_times], "compiled": layers.compiled(backend.layers),
        "fsdp2_ranks": backend.world_size if backend.dist.enabled else 0,
    }
    del backend
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def longest_pair(args, device: torch.device, options: dict) -> list[dict]:
    """One REDI step on a single pair of 2 x L tokens for growing L, until one does not fit."""
    out = []
    for length in args.longest:
        data = synthetic_pairs(1, length, args.tiny)
        prompt = data[0][0]
        comp = [3 + (k % VOCAB_WORDS) for k in range(length - len(prompt) - 1)] + [EOS]
        pair = [(prompt, comp, comp[::-1])]
        try:
            backend = new_backend(options, args, length, device)
            run = stage_run("redi")
            b = step_batches("redi", pair, 1)[0]
            sync(device)
            t = time.perf_counter()
            backend.forward_backward(b, micro_batch_loss(run, b))
            backend.optimizer_step(1e-6, 1.0)
            sync(device)
            peak = peak_gib(device)
            out.append({"run": "longest_pair", "pair_tokens": 2 * length, "fits": True, "peak_gb": round(peak, 2),
                        "step_s": round(time.perf_counter() - t, 3), "checkpointed_layers": backend.last_checkpointed_layers})
            del backend
        except torch.OutOfMemoryError as err:
            out.append({"run": "longest_pair", "pair_tokens": 2 * length, "fits": False, "error": str(err)[:200]})
            print("RESULT " + json.dumps(out[-1]), flush=True)
            break
        except Exception as err:  # noqa: BLE001
            out.append({"run": "longest_pair", "pair_tokens": 2 * length, "fits": False,
                        "error": f"{type(err).__name__}: {str(err)[:200]}"})
            print("RESULT " + json.dumps(out[-1]), flush=True)
            break
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print("RESULT " + json.dumps(out[-1]), flush=True)
    return out


def window(args) -> str:
    return f"{args.steps} timed steps after {args.warmup} warm-up steps, each side"


def markdown(results: list[dict], trl: list[dict], header: str, args) -> str:
    lines = [header, "", f"Timing window: {window(args)}.", "",
             "| run | max len | real tokens/s (fwd+bwd) | tokens/s (with optimizer) | padding | "
             "step p50 / p90 s | warm-up steps s | peak GiB | MFU | ckpt layers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['run']} | {r.get('max_len', '')} | error: {r['error'][:80]} | | | | | | | |")
            continue
        warm = " ".join(f"{t:.2f}" for t in r["warmup_step_s"])
        notes = ("" if r["compiled"] or r["options"].get("compile") in (None, False, "false") else " (fell back to eager)") + \
            (f" (FSDP2, {r['fsdp2_ranks']} rank{'s' if r['fsdp2_ranks'] > 1 else ''})" if r.get("fsdp2_ranks") else "")
        lines.append(f"| {r['run']}{notes} "
                     f"| {r['max_len']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_with_optimizer']:,.0f} | "
                     f"{100 * r['padding_fraction']:.1f}% | {r['step_s_p50']:.3f} / {r['step_s_p90']:.3f} | {warm} | "
                     f"{r['peak_gb']:.1f} | {100 * r['mfu']:.1f}% | {r['checkpointed_layers']} |")
    for r in trl:
        if r.get("run") == "longest_pair":
            fits = f"fits, peak {r['peak_gb']} GiB, {r['step_s']} s" if r["fits"] else "out of memory"
            lines.append(f"| one pair of {r['pair_tokens']:,} tokens | | {fits} | | | | | | | {r.get('checkpointed_layers', '')} |")
        elif "error" in r:
            lines.append(f"| {r['run']} (TRL) | {r.get('max_len', '')} | error: {str(r['error'])[-80:]} | | | | | | | |")
        else:
            warm = " ".join(f"{t:.2f}" for t in r["warmup_step_s"])
            lines.append(f"| {r['run']} (TRL) | {r['max_len']} | {r['tokens_per_s']:,.0f} | | | "
                         f"{r['step_s_p50']:.3f} / {r['step_s_p90']:.3f} | {warm} | {r['peak_gb']:.1f} | | |")
    found = ratios(results, trl)
    if found:
        lines += ["", f"Ratios against the fastest TRL setting of the peer trainer, same run, {window(args)}:"]
        lines += [f"- {x['run']} at {x['max_len']}: {x['ratio']:.2f}x {x['against']}'s tokens/s, "
                  f"peak {x['peak_gb']:.1f} vs {x['against_peak_gb']:.1f} GiB" for x in found]
    lora = lora_ratio_lines(results)
    return "\n".join(lines + ([""] + lora if lora else []))


def lora_ratio_lines(results: list[dict]) -> list[str]:
    """``--lora``: each LoRA run against its full fine-tuning twin of the same run (same data, same process)."""
    full = {(r["run"], r["max_len"]): r for r in results if "error" not in r}
    out = []
    for r in results:
        base = r["run"].split("+lora_rank=")[0]
        if "error" in r or "+lora_rank=" not in r["run"] or (base, r["max_len"]) not in full:
            continue
        f = full[base, r["max_len"]]
        out.append(f"- {r['run']} at {r['max_len']}: {r['tokens_per_s'] / f['tokens_per_s']:.2f}x {base}'s tokens/s "
                   f"(with optimizer {r['tokens_per_s_with_optimizer'] / f['tokens_per_s_with_optimizer']:.2f}x), "
                   f"peak {r['peak_gb']:.1f} vs {f['peak_gb']:.1f} GiB")
    return out


def parse_run(spec: str) -> tuple[str, str, dict]:
    """``mode[+key=value...]``, e.g. ``redi+activation_checkpointing=auto:24+optim_state_dtype=bf16``."""
    mode, *opts = spec.split("+")
    options = {}
    for o in opts:
        key, value = o.split("=", 1)
        options[key] = {"true": True, "false": False, "1": True, "0": False}.get(value.lower(), value) \
            if key in ("compile", "packing") else value
    if mode not in ("sft", "redi", "dpo", "simpo"):
        raise SystemExit(f"unknown mode {mode!r}")
    return spec, mode, options


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU: a smoke run in seconds")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES))
    p.add_argument("--max-len", type=int, nargs="+", default=None)
    p.add_argument("--runs", default="sft,redi,dpo,simpo",
                   help="comma-separated mode[+option=value...], modes sft redi dpo simpo")
    p.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step (trl_baseline's batch)")
    p.add_argument("--micro-pairs", type=int, default=None, help="pairs per micro-batch (packed row); default by length")
    p.add_argument("--steps", type=int, default=20, help="timed steps, each side")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, each side (compiling happens here)")
    p.add_argument("--lm-head-chunk", type=int, default=1024, help="the config default")
    p.add_argument("--longest", type=int, nargs="*", default=[], help="pair lengths L to try (2 x L tokens each)")
    p.add_argument("--longest-options", default="activation_checkpointing=auto:40",
                   help="backend options of the longest-pair runs, key=value joined by +")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--with-trl", action="store_true")
    p.add_argument("--trl-runs", default="simpo,sft,dpo", help="TRL trainers: simpo (CPOTrainer), sft, dpo")
    p.add_argument("--trl-settings", default="gc,nogc,gc+pf,nogc+pf",
                   help="gc / nogc: gradient checkpointing on / off; +pf: padding_free (SFTTrainer only)")
    p.add_argument("--trl-steps", type=int, default=0, help="timed TRL steps (default: --steps)")
    p.add_argument("--trl-timeout", type=int, default=900, help="seconds per TRL trainer and setting")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="also run each run with rank-RANK LoRA adapters (PEFT), beside full fine-tuning")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for the .json and .md results")
    p.add_argument("--stem", default="bench", help="file names: STEM-<max len>.{json,md}")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    args.shape = args.shape or ("tiny" if args.tiny or not cuda else "qwen2.5-1.5b")
    max_lens = args.max_len or ([256] if args.tiny else [4096])
    if args.tiny:
        args.pairs = min(args.pairs, 2)
        args.lm_head_chunk = min(args.lm_head_chunk, 256)
    runs = [parse_run(r) for r in args.runs.split(",") if r]
    if args.lora:
        runs = [twin for spec in runs for twin in (spec, parse_run(f"{spec[0]}+lora_rank={args.lora}"))]
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    import transformers

    header = (f"**{device_name}**, {datetime.date.today()}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}; shape {args.shape}; {args.pairs} pairs per step, {window(args)}; "
              f"tokens/s counts real tokens")
    print(header, flush=True)
    results, trl = [], []
    micro_default = args.micro_pairs
    for max_len in max_lens:
        args.micro_pairs = micro_default or (args.pairs if max_len <= 4096 else 1)
        data = synthetic_pairs(args.pairs * (args.steps + args.warmup + 2), max_len, args.tiny)
        if args.with_trl:  # first, so that TRL's peak is measured on a card this process has not touched yet
            trl.extend(run_trl(args, max_len))
        for name, mode, options in runs:
            try:
                r = run_one(name, mode, options, args, data, max_len, device)
            except Exception as err:  # noqa: BLE001 - one run's failure (OOM, compiler) must not hide the rest
                import traceback

                traceback.print_exc()
                kind = "out of memory" if isinstance(err, torch.OutOfMemoryError) else type(err).__name__
                r = {"run": name, "mode": mode, "max_len": max_len, "options": options, "error": f"{kind}: {str(err)[:200]}"}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print("RESULT " + json.dumps(r), flush=True)
            results.append(r)
    if args.longest:
        trl.extend(longest_pair(args, device, parse_run("redi+" + args.longest_options)[2] if args.longest_options else {}))
    table = markdown(results, trl, header, args)
    print("\n" + table, flush=True)
    if args.out and os.environ.get("RANK", "0") == "0":  # under torchrun every rank trains; rank 0 writes
        write_results(Path(args.out), args.stem + "-" + "-".join(str(m) for m in max_lens), args, header, results, trl,
                      table)


def write_results(out: Path, stem: str, args, header: str, results: list[dict], trl: list[dict], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({
        "header": header, "window": {"steps": args.steps, "warmup": args.warmup, "trl_steps": args.trl_steps or args.steps},
        "results": results, "trl": trl, "trl_best": [dict(r) for r in best_trl(trl).values()],
        "ratios": ratios(results, trl)}, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
