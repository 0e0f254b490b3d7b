"""One TRL trainer, one setting, in its own process: the baseline side of ``scripts/bench.py --with-trl``.

The same random-init model shape and the same synthetic pairs as bench.py (its generator, as text for TRL's
word-level tokenizer), TRL's own trainers (CPOTrainer with loss_type=simpo: reference-free like REDI;
DPOTrainer with a reference model; SFTTrainer on chosen and rejected), bf16 weights on CUDA as TRL's
examples run. Each ``training_step`` (forward + backward, the optimizer step excluded: what bench.py's
``tokens_per_s`` times too) is timed on its own after ``--warmup`` steps. Prints one ``RESULT {json}`` line:
real (non-pad) tokens/s over the timed steps, step p50/p90, peak GiB, and the setting.

    python scripts/bench_trl.py --trainer simpo --max-len 4096 --gradient-checkpointing off
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import EOS, VOCAB_WORDS, make_model, peak_gib, synthetic_pairs  # noqa: E402
from bench_args import add_defaults  # noqa: E402



def tokenizer():
    """trl_baseline.py's word-level tokenizer: "w{i}" -> id i + 3; <pad> 0, <eos> 1, <unk> 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": EOS, "<unk>": 2} | {f"w{i}": i + 3 for i in range(VOCAB_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def text_pairs(n: int, max_len: int, tiny: bool) -> list[dict]:
    """bench.py's pairs as text (its completions end in EOS, which TRL appends itself)."""
    def words(ids):
        return " ".join(f"w{i - 3}" for i in ids if i != EOS)

    return [{"prompt": words(p) + " ", "chosen": words(c), "rejected": words(r)} for p, c, r in synthetic_pairs(n, max_len, tiny)]


class Meter:
    """Times each ``training_step`` on its own and counts its real tokens."""

    def __init__(self, trainer, cuda: bool):
        self.cuda, self.times, self.tokens = cuda, [], []
        inner = trainer.training_step

        def step(model, inputs, *args, **kwargs):
            self._sync()
            t = time.perf_counter()
            out = inner(model, inputs, *args, **kwargs)
            self._sync()
            self.times.append(time.perf_counter() - t)
            self.tokens.append(real_tokens(inputs))
            return out

        trainer.training_step = step

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def real_tokens(inputs: dict) -> int:
    masks = {k: v for k, v in inputs.items() if k.endswith("attention_mask") and torch.is_tensor(v)}
    if len(masks) > 1:  # CPO keeps the prompt's mask beside the prompt+completion masks: count those only
        masks.pop("prompt_attention_mask", None)
    if masks:
        return sum(int(v.sum()) for v in masks.values())
    return int(inputs["input_ids"].numel())  # padding-free: one row of real tokens


def build_trainer(args, pairs: list[dict], tok, cuda: bool):
    from datasets import Dataset

    model = make_model(args.shape, args.max_len, torch.device("cuda" if cuda else "cpu"))
    if cuda:
        model = model.to(torch.bfloat16)
    common = dict(output_dir=args.output_dir, per_device_train_batch_size=args.pairs,
                  max_steps=args.steps + args.warmup, learning_rate=1e-6, logging_steps=10**6, save_strategy="no",
                  report_to=[], bf16=cuda, gradient_checkpointing=args.gradient_checkpointing == "on",
                  max_length=args.max_len, dataloader_num_workers=0, lr_scheduler_type="constant")
    if args.trainer == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        cfg = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0, **common)
        return CPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    if args.trainer == "dpo":
        from trl import DPOConfig, DPOTrainer

        ref = make_model(args.shape, args.max_len, model.device).to(model.dtype)
        cfg = DPOConfig(beta=0.01, **common)
        return DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": x["prompt"], "completion": x[k]} for x in pairs for k in ("chosen", "rejected")]
    common["per_device_train_batch_size"] = 2 * args.pairs  # chosen and rejected as SFT rows
    if args.padding_free:  # TRL refuses max_length without packing; the pairs are already cut to max_len
        common["max_length"] = None
    cfg = SFTConfig(padding_free=args.padding_free, **common)
    return SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)


TRL_SCRIPT = Path(__file__).resolve()
TRL_TRAINERS = {"simpo": "trl_cpo_simpo", "sft": "trl_sft", "dpo": "trl_dpo"}  # also our mode -> its TRL peer
PADDING_FREE_TRAINERS = ("sft",)  # TRL 1.16: DPOTrainer switches padding_free off, CPOTrainer lacks it


def trl_settings(trainer: str, spec: str) -> list[tuple[str, list[str]]]:
    """``gc,nogc,gc+pf,...`` -> (label, bench_trl.py flags) for this trainer; padding-free only where TRL has it."""
    out = []
    for label in [x for x in spec.split(",") if x]:
        parts = label.split("+")
        if "pf" in parts and trainer not in PADDING_FREE_TRAINERS:
            continue
        flags = ["--gradient-checkpointing", "off" if "nogc" in parts else "on"] + (["--padding-free"] if "pf" in parts else [])
        out.append((label, flags))
    return out


def run_trl(args, max_len: int) -> list[dict]:
    """Each TRL trainer and setting in its own process and time limit, so one slow or failing run loses only
    itself. Gradient checkpointing off is skipped where on already ran out of memory."""
    results = []
    for trainer in [r for r in args.trl_runs.split(",") if r]:
        oom_with_checkpointing = False
        for label, flags in trl_settings(trainer, args.trl_settings):
            name = f"{TRL_TRAINERS[trainer]} [{label}]"
            if oom_with_checkpointing and "nogc" in label.split("+"):
                results.append({"run": name, "max_len": max_len, "error": "skipped: out of memory with checkpointing"})
                continue
            cmd = [sys.executable, str(TRL_SCRIPT), "--trainer", trainer, "--max-len", str(max_len), "--pairs",
                   str(args.pairs), "--steps", str(args.trl_steps or args.steps), "--warmup", str(args.warmup), *flags]
            r = _trl_process(cmd + (["--tiny"] if args.tiny else []), args.trl_timeout)
            r.update(run=name, max_len=max_len, label=label)
            oom_with_checkpointing |= "error" in r and "out of memory" in r["error"].lower() and "nogc" not in label
            print("RESULT " + json.dumps(r), flush=True)
            results.append(r)
    return results


def _trl_process(cmd: list[str], timeout: int) -> dict:
    print("+ " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        stdout, stderr = out, f"timed out after {timeout} s"
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (stderr or stdout).strip().splitlines()
    oom = any("OutOfMemoryError" in line or "out of memory" in line for line in tail)
    return {"error": ("out of memory: " if oom else "") + (tail[-1] if tail else "no output")[-300:]}


def best_trl(trl: list[dict]) -> dict[tuple[str, int], dict]:
    """The fastest successful setting of each TRL trainer at each length: what a ratio is taken against."""
    best: dict[tuple[str, int], dict] = {}
    for r in trl:
        if "tokens_per_s" not in r or r.get("run") == "longest_pair":
            continue
        key = (r["run"].split(" [")[0], r["max_len"])
        if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = r
    return best


def ratios(results: list[dict], trl: list[dict]) -> list[dict]:
    """Every run of ours against the best TRL setting of its peer trainer, at the same length, in this run."""
    best = best_trl(trl)
    peer = {"redi": "trl_cpo_simpo", "simpo": "trl_cpo_simpo", "dpo": "trl_dpo", "sft": "trl_sft"}
    out = []
    for r in results:
        lora = r.get("options", {}).get("lora_rank")  # TRL runs full fine-tuning: no ratio for LoRA runs
        t = best.get((peer[r["mode"]], r["max_len"])) if "error" not in r and not lora else None
        if t:
            out.append({"run": r["run"], "max_len": r["max_len"], "against": t["run"],
                        "ratio": round(r["tokens_per_s"] / t["tokens_per_s"], 3),
                        "peak_gb": r["peak_gb"], "against_peak_gb": t["peak_gb"]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainer", choices=sorted(TRL_TRAINERS), required=True)
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on")
    p.add_argument("--padding-free", action="store_true", help="SFTTrainer only")
    p.add_argument("--tiny", action="store_true", help="bench.py's tiny shape and short prompts, on the CPU")
    add_defaults(p, max_len=4096, pairs=4, steps=20, warmup=5, shape="qwen2.5-1.5b", output_dir="/tmp/redi_bench_trl")
    args = p.parse_args()
    if args.padding_free and args.trainer not in PADDING_FREE_TRAINERS:
        raise SystemExit(f"padding_free: TRL 1.16 supports it in SFTTrainer only, not {args.trainer}")
    cuda = torch.cuda.is_available() and not args.tiny
    if args.tiny:
        args.shape = "tiny"
    name = "trl_" + {"simpo": "cpo_simpo"}.get(args.trainer, args.trainer)
    setting = {"gradient_checkpointing": args.gradient_checkpointing == "on", "padding_free": args.padding_free}
    pairs = text_pairs(args.pairs * (args.steps + args.warmup + 2), args.max_len, args.tiny)
    trainer = build_trainer(args, pairs, tokenizer(), cuda)
    meter = Meter(trainer, cuda)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed, tokens = meter.times[args.warmup:], meter.tokens[args.warmup:]
    if len(timed) < args.steps:
        raise SystemExit(f"{name}: {len(timed)} timed steps, expected {args.steps}")
    peak = peak_gib(torch.device("cuda" if cuda else "cpu"))
    print("RESULT " + json.dumps({
        "run": name, "max_len": args.max_len, "setting": setting, "tokens_per_s": round(sum(tokens) / sum(timed), 1),
        "step_s_p50": round(statistics.median(timed), 4), "step_s_p90": round(float(np.percentile(timed, 90)), 4),
        "timed_steps": len(timed), "warmup_steps": args.warmup, "timed_tokens": int(sum(tokens)),
        "warmup_step_s": [round(t, 3) for t in meter.times[:args.warmup]], "peak_gb": round(peak, 2),
        "device": torch.cuda.get_device_name() if cuda else "cpu"}), flush=True)


if __name__ == "__main__":
    main()
