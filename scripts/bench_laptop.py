"""Laptop-scale speed: one `redi train` step against one baseline trainer's step, interleaved, in one run.

Chat rows of about ``--row-tokens`` tokens (random words in the model's chat template; prompt about a quarter),
``--rows`` sequences per optimizer step (pairs: half as many pairs), fp32, the same rows for both sides. Our side
is the training loop's step with the config's defaults (micro_batch_tokens auto, packing, fused AdamW on the
CPU): the core's micro-batches, ``forward_backward`` each, ``optimizer_step``. The baselines at their best settings:

- ``transformers``: a plain loop, one padded batch, ``model(..., labels=...)``, backward, fused AdamW;
- ``trl-sft`` / ``trl-sft-pf``: TRL's SFTTrainer on the same token ids (completion-only loss), padded or
  ``padding_free`` (on sdpa TRL's padding-free rows attend across row boundaries: faster, not exact);
- ``trl-simpo``: TRL's CPOTrainer with ``loss_type=simpo, cpo_alpha=0`` against our ``objective simpo``;
- ``mlx-lm-full`` / ``mlx-lm-lora``: mlx-lm's own ``tuner.trainer.train`` loop (what ``mlx_lm.lora`` runs),
  every layer trained (``--fine-tune-type full``, ``--num-layers -1``) or rank-``--lora-rank`` LoRA on all seven
  linears of every layer (ours: the same adapters), AdamW. ``mlx_lm.lora`` leaves the embeddings (and a tied LM
  head) and the final norm frozen; ``mlx-lm-all`` is the same loop with every weight trained, as redi does.

Steps alternate (one ours, one theirs); TRL's and mlx-lm's loops run ours from inside their own (a callback,
the batch iterator) and their step time is the wall time between two of their steps less ours. Each side:
``--warmup`` (>= 5) untimed then ``--steps`` (>= 20) timed steps; the table gives real (non-pad) tokens/s and
the ratio, with the window and the machine. Only a ratio from one run is a claim.

    python scripts/bench_laptop.py --backend cpu --against transformers --model /work/cache/smollm2-hf
    python scripts/bench_laptop.py --backend mlx --against mlx-lm-full --model /work/cache/smollm2-hf
    python scripts/bench_laptop.py --backend cpu --against transformers --model random:qwen2.5-0.5b \\
        --tokenizer /work/cache/smollm2-hf --row-tokens 2048 --rows 2
    python scripts/bench_laptop.py --smoke --backend cpu --against trl-simpo   # tiny model, 1 + 2 steps
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from redi.backend import backend_options, make_backend  # noqa: E402
from redi.config import Config, StageConfig  # noqa: E402
from redi.data import Encoder, TokenizedPair, TokenizedSeq  # noqa: E402
from redi.objectives import make_objective  # noqa: E402
from redi.training.loop import StageRun, _accumulate, resolve_token_budget  # noqa: E402

AGAINST = {"cpu": ("transformers", "trl-sft", "trl-sft-pf", "trl-simpo"), "mlx": ("mlx-lm-full", "mlx-lm-all", "mlx-lm-lora")}
WORDS = ("the of and to in is was that for on as with by at from his her an which or be are this had not but "
         "what all were when we there can number seven sum prove answer step then so because first").split()
LR = 1e-5


# ------------------------------------------------------------------------------------------ model and data

def model_folder(spec: str, tokenizer: str, max_len: int) -> str:
    """An HF folder: the path itself, or ``random:SHAPE`` (bench_data's shapes) saved with ``tokenizer``'s files."""
    if not spec.startswith("random:"):
        return spec
    from bench_data import make_model
    import torch
    from redi.model_dir import copy_tokenizer_files

    out = Path(tempfile.mkdtemp(prefix="redi-bench-laptop-"))
    model = make_model(spec.split(":", 1)[1], max_len, torch.device("cpu"))
    model.config.pad_token_id = model.config.eos_token_id = None  # the tokenizer's own
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(Path(tokenizer), out)
    return str(out)


def chat_rows(tokenizer_path: str, n: int, row_tokens: int, seed: int) -> list[TokenizedSeq]:
    """``n`` chat rows of about ``row_tokens`` tokens: a user turn (a quarter) and an assistant turn."""
    from transformers import AutoTokenizer

    enc = Encoder(AutoTokenizer.from_pretrained(tokenizer_path), "", tokenizer_path)
    rng = np.random.default_rng(seed)

    def row(prompt_words: int, completion_words: int) -> TokenizedSeq:
        p, c = enc.texts([{"role": "user", "content": " ".join(rng.choice(WORDS, max(1, prompt_words)))}],
                         [{"role": "assistant", "content": " ".join(rng.choice(WORDS, max(1, completion_words)))}])
        ids = enc.encode_many([p, c])
        return enc.finish(ids[0], ids[1], 0)

    probe = row(row_tokens // 4, 3 * row_tokens // 4)
    scale = row_tokens / probe.length  # about one token per word; the template adds a few
    return [row(int(row_tokens // 4 * scale), int(3 * row_tokens // 4 * scale)) for _ in range(n)]


def steps_of(rows: list[TokenizedSeq], per_step: int, pairs: bool) -> list[list]:
    """Rows cut into optimizer steps; pairs take consecutive rows as (chosen, rejected) with one prompt."""
    if pairs:
        items = [TokenizedPair(a, TokenizedSeq(a.prompt, b.completion)) for a, b in zip(rows[::2], rows[1::2])]
        per_step //= 2
    else:
        items = list(rows)
    return [items[i:i + per_step] for i in range(0, len(items) - per_step + 1, per_step)]


def real_tokens(step: list) -> int:
    return sum(e.chosen.length + e.rejected.length if isinstance(e, TokenizedPair) else e.length for e in step)


# ------------------------------------------------------------------------------------------ our side

class Ours:
    """redi's training step with the config's defaults, through the core (batching) and the backend."""

    def __init__(self, backend_name: str, model: str, pairs: bool, lora_rank: int, longest_step: list):
        cfg = Config(lora_rank=lora_rank)
        self.backend = make_backend(backend_name, 0, **backend_options(cfg, backend_name))
        self.backend.load(model, precision="fp32", lm_head_chunk=cfg.lm_head_chunk)
        self.backend.init_optimizer(weight_decay=cfg.pairs.weight_decay if pairs else cfg.sft.weight_decay)
        self.objective = make_objective("simpo") if pairs else None
        self.settings = StageConfig(batch_size=len(longest_step))  # micro_batch_tokens auto, no row cap
        run = self._run(longest_step)
        self.budget = resolve_token_budget(run, self.backend)

    def _run(self, step: list) -> StageRun:
        return StageRun("pairs" if self.objective else "sft", self.settings, step, self.objective, 0)

    def step(self, step: list) -> float:
        t = time.perf_counter()
        run = self._run(step)
        run.micro_batch_tokens = self.budget
        self.micro_batches = run.plan().micro_batches(0, step)
        _accumulate(run, self.backend, self.micro_batches)
        self.backend.optimizer_step(LR, 1.0)
        return time.perf_counter() - t


class Timer:
    """Per-side step times and real tokens; the first ``warmup`` steps are dropped."""

    def __init__(self, name: str, warmup: int):
        self.name, self.warmup, self.times, self.tokens = name, warmup, [], []

    def add(self, seconds: float, tokens: int) -> None:
        self.times.append(seconds)
        self.tokens.append(tokens)

    @property
    def timed(self) -> tuple[list[float], list[int]]:
        return self.times[self.warmup:], self.tokens[self.warmup:]

    def tokens_per_s(self) -> float:
        t, n = self.timed
        return sum(n) / sum(t) if t else float("nan")


# ------------------------------------------------------------------------------------------ baselines

def padded(step: list[TokenizedSeq], pad: int):
    """One right-padded batch: ids, attention mask, labels (-100 on prompt and padding)."""
    import torch

    width = max(s.length for s in step)
    ids = torch.full((len(step), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(step):
        row = torch.as_tensor(np.concatenate([s.prompt, s.completion]).astype(np.int64))
        ids[i, :s.length], mask[i, :s.length] = row, 1
        labels[i, len(s.prompt):s.length] = row[len(s.prompt):]
    return ids, mask, labels


def hf_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model.train()


def run_transformers(model_path: str, steps: list, ours: Ours, mine: Timer, theirs: Timer) -> str:
    import torch

    model = hf_model(model_path)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    pad = model.config.pad_token_id or 0
    for step in steps:
        mine.add(ours.step(step), real_tokens(step))
        t = time.perf_counter()
        ids, mask, labels = padded(step, pad)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        theirs.add(time.perf_counter() - t, int(mask.sum()))
    return "one padded batch, sdpa, fused AdamW, no clipping"


def run_trl(kind: str, model_path: str, steps: list, ours: Ours, mine: Timer, theirs: Timer) -> str:
    """TRL's trainer runs its own loop; a callback runs our step after each of theirs."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from bench_trl import real_tokens as trl_tokens

    tok = AutoTokenizer.from_pretrained(model_path)
    common = dict(output_dir=tempfile.mkdtemp(prefix="redi-bench-trl-"), max_steps=len(steps), learning_rate=LR,
                  lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                  bf16=False, dataloader_num_workers=0, optim="adamw_torch_fused", seed=0)
    if kind == "trl-simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        rows = [{"prompt": tok.decode(e.chosen.prompt), "chosen": tok.decode(e.chosen.completion),
                 "rejected": tok.decode(e.rejected.completion)} for step in steps for e in step]
        cfg = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0, max_length=8 * real_tokens(steps[0]),
                        per_device_train_batch_size=len(steps[0]), **common)
        trainer = CPOTrainer(model=hf_model(model_path), args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
        setting = "CPOTrainer loss_type=simpo cpo_alpha=0 (padded; TRL has no padding_free here)"
    else:
        from trl import SFTConfig, SFTTrainer

        rows = [{"input_ids": [int(x) for x in np.concatenate([s.prompt, s.completion])],
                 "completion_mask": [0] * len(s.prompt) + [1] * len(s.completion)} for step in steps for s in step]
        pf = kind == "trl-sft-pf"
        cfg = SFTConfig(padding_free=pf, max_length=None, completion_only_loss=True, shuffle_dataset=False,
                        per_device_train_batch_size=len(steps[0]), **common)
        trainer = SFTTrainer(model=hf_model(model_path), args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)
        setting = "SFTTrainer, completion-only loss, " + ("padding_free (sdpa: rows not isolated)" if pf else "padded")
    counted: list[int] = []
    inner = trainer.training_step

    def training_step(model, inputs, *a, **kw):
        counted.append(trl_tokens(inputs))
        return inner(model, inputs, *a, **kw)

    trainer.training_step = training_step

    class Interleave(TrainerCallback):
        mark = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if not self.mark:
                self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            theirs.add(time.perf_counter() - self.mark, sum(counted))
            counted.clear()
            step = steps[len(mine.times) % len(steps)]
            mine.add(ours.step(step), real_tokens(step))
            self.mark = time.perf_counter()

    trainer.add_callback(Interleave())
    trainer.train()
    return setting + ", fused AdamW, max_grad_norm 1"


def run_mlx_lm(kind: str, model_path: str, steps: list, ours: Ours, mine: Timer, theirs: Timer, rank: int) -> str:
    """mlx-lm's own train loop; its batch iterator runs our step before handing over each batch."""
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(model_path)
    model.freeze()
    if kind == "mlx-lm-full":  # mlx_lm.lora --fine-tune-type full --num-layers -1: every decoder layer
        for layer in model.layers:
            layer.unfreeze()
        setting = "--fine-tune-type full --num-layers -1 (embeddings frozen, as mlx_lm.lora)"
    elif kind == "mlx-lm-all":  # the same loop with every weight trainable: the work redi's step does
        model.unfreeze()
        setting = "its full fine-tune loop with every weight trained (embeddings and final norm too)"
    else:
        keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"]
        linear_to_lora_layers(model, len(model.layers), {"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": keys})
        setting = f"--fine-tune-type lora, rank {rank}, scale 20, all 7 linears, every layer"
    seqs = [s for step in steps for s in step]
    dataset = [(list(np.concatenate([s.prompt, s.completion]).astype(int)), len(s.prompt)) for s in seqs]
    previous: list = []  # (when their step began, its real tokens)

    def batches(**kw):
        for batch in iterate_batches(**kw):
            if previous:  # resumed: their last step is done
                began, tokens = previous.pop()
                theirs.add(time.perf_counter() - began, tokens)
            step = steps[len(mine.times) % len(steps)]
            mine.add(ours.step(step), real_tokens(step))
            previous.append((time.perf_counter(), int(batch[1][:, 1].sum().item())))
            yield batch

    # clear_cache_threshold: mlx-lm empties MLX's buffer cache after every step by default, and in one process
    # that cache is redi's too (redi raises its CPU limit to keep a step's buffers). Neither side clears it;
    # theirs is faster for it as well (4.06 s a step against 4.13-4.17 s, SmolLM2, 4 x 85 tokens).
    args = TrainingArgs(batch_size=len(steps[0]), iters=len(steps) + 1, steps_per_report=10**6, steps_per_eval=10**6,
                        steps_per_save=10**6, max_seq_length=8 * max(s.length for s in seqs), clear_cache_threshold=1 << 60,
                        adapter_file=str(Path(tempfile.mkdtemp(prefix="redi-bench-mlx-")) / "adapters.safetensors"))
    train(model, optim.AdamW(learning_rate=LR, weight_decay=0.0), dataset, args=args, iterate_batches=batches)
    return setting + ", AdamW, its compiled step, cache not cleared between steps"


# ------------------------------------------------------------------------------------------ the table

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical cores"


def versions(backend: str) -> str:
    import importlib.metadata as md

    names = ("torch", "transformers", "trl") if backend == "cpu" else ("mlx", "mlx-lm")
    out = []
    for name in names:
        try:
            out.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def table(args, setting: str, mine: Timer, theirs: Timer, window: tuple[str, str], budget: int) -> str:
    ratio = mine.tokens_per_s() / theirs.tokens_per_s()
    lines = [f"**{args.backend}: redi vs {args.against}**, {args.model}, {args.rows} rows of ~{args.row_tokens} tokens "
             f"per step, fp32. Window {window[0]} - {window[1]} UTC; {machine()}; {versions(args.backend)}.",
             f"Each side {args.warmup} warm-up + {len(mine.timed[0])} / {len(theirs.timed[0])} timed steps, interleaved. "
             f"Ours: the defaults (micro_batch_tokens auto = {budget:,}). Theirs: {setting}.", "",
             "| side | step s (median) | step s (p90) | real tokens/s | ratio |", "|---|---|---|---|---|"]
    for timer, r in ((mine, f"**{ratio:.2f}x**"), (theirs, "1.00x")):
        t, _ = timer.timed
        lines.append(f"| {timer.name} | {statistics.median(t):.3f} | {np.percentile(t, 90):.3f} | "
                     f"{timer.tokens_per_s():,.1f} | {r} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=sorted(AGAINST), default="cpu")
    p.add_argument("--against", required=True, choices=[a for v in AGAINST.values() for a in v])
    p.add_argument("--model", default="/work/cache/smollm2-hf", help="HF folder, or random:SHAPE (bench_data.SHAPES)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for random:SHAPE models")
    p.add_argument("--row-tokens", type=int, default=512)
    p.add_argument("--rows", type=int, default=4, help="sequences per optimizer step (pairs: half as many pairs)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="check the script: tiny model, 1 warm-up + 2 timed steps")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args()
    if args.against not in AGAINST[args.backend]:
        raise SystemExit(f"--backend {args.backend} compares against: {', '.join(AGAINST[args.backend])}")
    if args.smoke:
        from redi.builtin import materialise_model

        args.model = str(materialise_model("builtin:tiny", Path(tempfile.mkdtemp(prefix="redi-smoke-")), 0, {}))
        args.row_tokens, args.warmup, args.steps = min(args.row_tokens, 48), 1, 2
    elif args.warmup < 5 or args.steps < 20:
        raise SystemExit("a claim needs at least 5 warm-up and 20 timed steps per side (--smoke only checks the script)")
    pairs = args.against == "trl-simpo"
    model = model_folder(args.model, args.tokenizer or args.model, 4 * args.row_tokens)
    n = args.rows * (args.warmup + args.steps + 1)
    steps = steps_of(chat_rows(args.tokenizer or model, n, args.row_tokens, seed=0), args.rows, pairs)
    ours = Ours(args.backend, model, pairs, args.lora_rank if args.against == "mlx-lm-lora" else 0, steps[0])
    mine, theirs = Timer("redi train (defaults)", args.warmup), Timer(args.against, args.warmup)
    start = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    if args.against == "transformers":
        setting = run_transformers(model, steps, ours, mine, theirs)
    elif args.against.startswith("trl"):
        setting = run_trl(args.against, model, steps, ours, mine, theirs)
    else:
        setting = run_mlx_lm(args.against, model, steps, ours, mine, theirs, args.lora_rank)
    end = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M")
    out = table(args, setting, mine, theirs, (start, end), ours.budget)
    print(out, flush=True)
    if args.out:
        Path(args.out).write_text(out)


if __name__ == "__main__":
    main()
