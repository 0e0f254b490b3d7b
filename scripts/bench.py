"""Throughput and memory of the torch backend against TRL, on the same synthetic data, in one script.

A random-init model of a named shape (default: Qwen2.5-1.5B's), synthetic pairs from the same generator as
``trl_baseline.py`` (prompt 256 tokens, log-normal completions capped to the max length), trained through
the backend's public API (``forward_backward`` per micro-batch, ``optimizer_step``) with the project's own
losses. Per run: real (non-pad) tokens/s over forward+backward (what TRL's meter times) and over the whole
step (optimizer included), padding fraction, step time p50/p90, peak GPU memory, MFU, the layers the
planner checkpointed. ``--longest`` trains single pairs of growing length until one does not fit.
``--with-trl`` runs trl_baseline.py on the same GPU afterwards and prints the ratios: only a ratio measured
in one run is a valid claim.

    python scripts/bench.py --tiny                        # CPU smoke run, seconds
    python scripts/bench.py --max-len 4096 --with-trl     # the GPU measurement (scripts/gpu_check.sh)
    python scripts/bench.py --tiny --lora 16              # each run again with rank-16 LoRA adapters (PEFT)
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from redi.backends.torch_cuda.backend import TorchBackend  # noqa: E402
from redi.backends.torch_cuda.packing import pack  # noqa: E402
from redi.backend import MicroBatch  # noqa: E402
from redi.data import TokenizedSeq  # noqa: E402
from redi.training.loop import StageRun, micro_batch_loss  # noqa: E402
from redi.lora import LoraSpec  # noqa: E402
from redi.objectives import make_objective  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "tiny": (64, 128, 2, 4, 2, 32003, True),  # trl_baseline.py --tiny
}
VOCAB_WORDS = 32000  # trl_baseline.py's word-level vocabulary: "w{i}" -> id i + 3; <pad> 0, <eos> 1
EOS = 1
OBJECTIVES = {"redi": "redi", "simpo": "simpo", "dpo": "dpo"}


def synthetic_pairs(n: int, max_len: int, tiny: bool) -> list[tuple[list[int], list[int], list[int]]]:
    """trl_baseline.py's data, as ids: the same random stream, so the same lengths and tokens."""
    rng = random.Random(0)
    prompt_len = 16 if tiny else 256

    def words(k: int) -> list[int]:
        return [rng.randrange(VOCAB_WORDS) + 3 for _ in range(k)]

    def comp_len() -> int:
        hi = max_len - prompt_len - 1
        return max(16, min(hi, int(rng.lognormvariate(math.log(hi * 0.45), 0.5))))

    out = []
    for _ in range(n):
        prompt = words(prompt_len)
        chosen = words(comp_len())
        rejected = words(comp_len())
        out.append((prompt, chosen + [EOS], rejected + [EOS]))
    return out


def make_model(shape: str, max_len: int, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h, i, n_layers, heads, kv, vocab, tied = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(max_len, 32768),
                      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, pad_token_id=0,
                      eos_token_id=EOS, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(cfg)


def peak_gib(device: torch.device) -> float:
    """Peak GPU memory since the last reset; on the CPU the process's peak RSS so far (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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


def run_one(name: str, mode: str, options: dict, args, data, max_len: int, device: torch.device) -> dict:
    options = dict(options)
    micro_pairs = int(options.pop("micro_pairs", args.micro_pairs))
    rank = int(options.get("lora_rank", 0))  # stays in the result's options: no TRL ratio for LoRA runs
    backend = TorchBackend(device.type, seed=0, lora=LoraSpec(rank) if rank else None,
                           **{k: v for k, v in options.items() if k != "lora_rank"})
    backend.adopt(make_model(args.shape, max_len, device), lm_head_chunk=args.lm_head_chunk)
    backend.init_optimizer(weight_decay=0.0)
    n_params = backend.num_parameters()
    h, _, n_layers, *_ = SHAPES[args.shape]
    run = StageRun(mode, None, [], None if mode == "sft" else make_objective(OBJECTIVES[mode]), 0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    steps = [data[s * args.pairs:(s + 1) * args.pairs] for s in range(args.warmup + args.steps)]
    ref_s = 0.0
    refs = {}
    if mode == "dpo":  # the reference log-probs: one no-grad pass, cached, no second model held
        sync(device)
        t = time.perf_counter()
        for s, pairs in enumerate(steps):
            for b in step_batches(mode, pairs, micro_pairs):
                logps, _ = backend.sequence_logps(b)
                refs[(s, tuple(b.indices))] = logps
        sync(device)
        ref_s = time.perf_counter() - t
    fb_times, step_times, tokens, padded, flops, ckpt = [], [], [], [], [], []
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
        if s >= args.warmup:
            fb_times.append(t1 - t0)
            step_times.append(t2 - t0)
            lens = [q.length for b in batches for q in b.seqs]
            tokens.append(sum(lens))
            padded.append(sum(pack(b, 0).width for b in batches))
            # LoRA: no weight gradients for the frozen base, so 4 N per token instead of 6 N (adapters ignored)
            per = 4 if rank else 6
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
        "micro_pairs": micro_pairs,
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
            backend = TorchBackend(device.type, seed=0, **options)
            backend.adopt(make_model(args.shape, length, device), lm_head_chunk=args.lm_head_chunk)
            backend.init_optimizer(weight_decay=0.0)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            run = StageRun("pairs", None, [], make_objective("redi"), 0)
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


def find_trl_script(explicit: str | None) -> Path | None:
    candidates = [explicit, os.environ.get("REDI_TRL_BASELINE"), ROOT / "shared/tools/trl_baseline.py",
                  ROOT.parent / "shared/tools/trl_baseline.py", ROOT / ".whl/trl_baseline.py"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def run_trl(args, max_len: int) -> list[dict]:
    """Each TRL trainer in its own process and time limit, so one slow or failing trainer loses only itself."""
    script = find_trl_script(args.trl_script)
    if script is None:
        return [{"run": "trl", "error": "trl_baseline.py not found (--trl-script or REDI_TRL_BASELINE)"}]
    results = []
    for trl_run in [r for r in args.trl_runs.split(",") if r]:
        cmd = [sys.executable, str(script), "--max-len", str(max_len), "--pairs", str(args.pairs),
               "--steps", str(args.trl_steps or args.steps), "--warmup", str(args.warmup), "--runs", trl_run]
        if args.tiny:
            cmd.append("--tiny")
        print("+ " + " ".join(cmd), flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.trl_timeout)
            stdout, stderr, failed = proc.stdout, proc.stderr, proc.returncode != 0
        except subprocess.TimeoutExpired as err:
            def text(b):
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
            stdout, stderr, failed = text(err.stdout), f"timed out after {args.trl_timeout} s", True
        found = []
        for line in stdout.splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[len("RESULT "):])
                r["max_len"] = max_len
                found.append(r)
        if failed and not found:
            found.append({"run": f"trl_{trl_run}", "max_len": max_len, "error": (stderr or stdout)[-600:]})
        for r in found:
            print("RESULT " + json.dumps(r), flush=True)
        results.extend(found)
    return results


def markdown(results: list[dict], trl: list[dict], header: str) -> str:
    lines = [header, "", "| run | max len | real tokens/s (fwd+bwd) | tokens/s (with optimizer) | padding | "
             "step p50 / p90 s | peak GiB | MFU | ckpt layers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['run']} | {r.get('max_len', '')} | error: {r['error'][:80]} | | | | | | |")
            continue
        lines.append(f"| {r['run']} | {r['max_len']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_with_optimizer']:,.0f} | "
                     f"{100 * r['padding_fraction']:.1f}% | {r['step_s_p50']:.3f} / {r['step_s_p90']:.3f} | "
                     f"{r['peak_gb']:.1f} | {100 * r['mfu']:.1f}% | {r['checkpointed_layers']} |")
    for r in trl:
        if r.get("run") == "longest_pair":
            fits = f"fits, peak {r['peak_gb']} GiB, {r['step_s']} s" if r["fits"] else "out of memory"
            lines.append(f"| one pair of {r['pair_tokens']:,} tokens | | {fits} | | | | | | {r.get('checkpointed_layers', '')} |")
        elif "error" in r:
            lines.append(f"| {r['run']} (TRL) | {r.get('max_len', '')} | error: {str(r['error'])[-80:]} | | | | | | |")
        else:
            lines.append(f"| {r['run']} (TRL) | {r['max_len']} | {r['tokens_per_s']:,.0f} | | | | {r['peak_gb']:.1f} | | |")
    ratios = ratio_lines(results, [r for r in trl if "tokens_per_s" in r and r.get("run") != "longest_pair"])
    ratios += lora_ratio_lines(results)
    return "\n".join(lines + ([""] + ratios if ratios else []))


def ratio_lines(results: list[dict], trl: list[dict]) -> list[str]:
    against = {"redi": "trl_cpo_simpo", "simpo": "trl_cpo_simpo", "dpo": "trl_dpo", "sft": "trl_sft"}
    out = []
    for r in results:
        if "error" in r or r["options"]:
            continue
        for t in trl:
            if t["run"] == against[r["mode"]] and t["max_len"] == r["max_len"]:
                out.append(f"- {r['run']} at {r['max_len']}: {r['tokens_per_s'] / t['tokens_per_s']:.2f}x "
                           f"{t['run']}'s tokens/s, peak {r['peak_gb']:.1f} vs {t['peak_gb']:.1f} GiB")
    return out


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU: a smoke run in seconds")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES))
    p.add_argument("--max-len", type=int, nargs="+", default=None)
    p.add_argument("--runs", default="sft,redi,dpo,simpo",
                   help="comma-separated mode[+option=value...], modes sft redi dpo simpo")
    p.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step (trl_baseline's batch)")
    p.add_argument("--micro-pairs", type=int, default=None, help="pairs per micro-batch (packed row); default by length")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lm-head-chunk", type=int, default=1024, help="the config default")
    p.add_argument("--longest", type=int, nargs="*", default=[], help="pair lengths L to try (2 x L tokens each)")
    p.add_argument("--longest-options", default="activation_checkpointing=auto:40",
                   help="backend options of the longest-pair runs, key=value joined by +")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--with-trl", action="store_true")
    p.add_argument("--trl-runs", default="simpo,sft,dpo")
    p.add_argument("--trl-steps", type=int, default=0)
    p.add_argument("--trl-script", default=None)
    p.add_argument("--trl-timeout", type=int, default=900, help="seconds per TRL trainer")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="also run each run with rank-RANK LoRA adapters (PEFT), beside full fine-tuning")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for bench.json and bench.md")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    args.shape = args.shape or ("tiny" if args.tiny or not cuda else "qwen2.5-1.5b")
    max_lens = args.max_len or ([256] if args.tiny else [4096])
    if args.tiny:
        args.pairs, args.steps, args.warmup = min(args.pairs, 2), min(args.steps, 2), min(args.warmup, 1)
        args.lm_head_chunk = min(args.lm_head_chunk, 256)
    runs = [parse_run(r) for r in args.runs.split(",") if r]
    if args.lora:
        runs = [twin for spec in runs for twin in (spec, parse_run(f"{spec[0]}+lora_rank={args.lora}"))]
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    import transformers

    header = (f"**{device_name}**, {datetime.date.today()}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}; shape {args.shape}; {args.pairs} pairs per step, {args.steps} timed steps "
              f"after {args.warmup}; tokens/s counts real tokens")
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
    table = markdown(results, trl, header)
    print("\n" + table, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "bench-" + "-".join(str(m) for m in max_lens)
        (out / f"{stem}.json").write_text(json.dumps({"results": results, "trl": trl, "header": header}, indent=2))
        (out / f"{stem}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
