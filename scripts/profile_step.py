"""Where one training step's time goes: torch.profiler over one REDI step, top kernels by time as markdown.

bench.py's model and data (``--shape``, ``--max-len``, ``--pairs``), the backend's options (default
``compile=true``), ``--warmup`` untimed steps first (compiling happens there), then one profiled step:
forward + backward of every micro-batch and the optimizer step. On CUDA the table lists GPU kernels by
self device time; on the CPU, operators by self CPU time (the same tool, checked in CI on a tiny model).

    python scripts/profile_step.py --max-len 4096 --out docs/profile-4096.md      # one H200: the real one
    python scripts/profile_step.py --tiny --out /tmp/profile.md                   # CPU smoke run
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import new_backend, parse_run, stage_run, step_batches, sync  # noqa: E402
from bench_data import SHAPES, synthetic_pairs  # noqa: E402
from redi.backends.torch_cuda import layers  # noqa: E402
from redi.training.loop import micro_batch_loss  # noqa: E402


def train_step(backend, run, batches) -> None:
    for b in batches:
        backend.forward_backward(b, micro_batch_loss(run, b))
    backend.optimizer_step(1e-6, 1.0)


def top_rows(prof, cuda: bool, top: int) -> tuple[list[tuple[str, int, float]], float]:
    """(name, calls, self µs) of the ``top`` costliest kernels (CUDA) or operators (CPU), and the total µs."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    if cuda:  # the kernels themselves, each event once, by the time it held the GPU
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                totals[e.name][0] += 1
                totals[e.name][1] += e.device_time_total
    else:
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                totals[e.key] = [e.count, e.self_cpu_time_total]
    total = sum(t for _, t in totals.values())
    rows = sorted(((name, int(c), t) for name, (c, t) in totals.items()), key=lambda r: -r[2])
    return rows[:top], total


def markdown(rows, total: float, step_s: float, header: str, cuda: bool) -> str:
    what = "GPU kernel" if cuda else "CPU operator"
    lines = [header, "", f"One profiled step: {step_s:.3f} s wall (profiler on); {what}s' self time in all: "
             f"{total / 1e3:,.1f} ms. Top {len(rows)} by self time:", "",
             f"| # | {what} | calls | self ms | share |", "|---|---|---|---|---|"]
    for i, (name, calls, t) in enumerate(rows, 1):
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| {i} | `{short.replace('|', '/')}` | {calls} | {t / 1e3:,.2f} | {100 * t / total:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES))
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--micro-pairs", type=int, default=None)
    p.add_argument("--lm-head-chunk", type=int, default=1024)
    p.add_argument("--run", default="redi+compile=true", help="bench.py's mode[+option=value...]")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the profiled one")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None, help="markdown file to write (printed either way)")
    p.add_argument("--trace", default=None, help="also write a Chrome trace (JSON) here")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    args.shape = args.shape or ("tiny" if not cuda else "qwen2.5-1.5b")
    max_len = args.max_len or (256 if args.tiny else 4096)
    if args.tiny:
        args.pairs, args.lm_head_chunk = min(args.pairs, 2), min(args.lm_head_chunk, 256)
    micro_pairs = args.micro_pairs or (args.pairs if max_len <= 4096 else 1)
    name, mode, options = parse_run(args.run)
    backend = new_backend(options, args, max_len, device)
    run = stage_run(mode)
    if mode == "dpo":
        raise SystemExit("profile_step.py profiles sft, redi and simpo (dpo needs the reference pass)")
    data = synthetic_pairs(args.pairs * (args.warmup + 1), max_len, args.tiny)
    steps = [step_batches(mode, data[s * args.pairs:(s + 1) * args.pairs], micro_pairs) for s in range(args.warmup + 1)]
    for batches in steps[:-1]:
        train_step(backend, run, batches)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        train_step(backend, run, steps[-1])
        sync(device)
        step_s = time.perf_counter() - t
    rows, total = top_rows(prof, cuda, args.top)
    import transformers

    tokens = sum(q.length for b in steps[-1] for q in b.seqs)
    header = (f"**{torch.cuda.get_device_name() if cuda else 'cpu'}**, {datetime.date.today()}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}; shape {args.shape}, max length {max_len}, `{name}` "
              f"(compiled: {layers.compiled(backend.layers)}), {args.pairs} pairs, {tokens:,} real tokens, "
              f"after {args.warmup} warm-up steps")
    table = markdown(rows, total, step_s, header, cuda)
    print(table, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
