"""What each config key does and which backend reads it: the source of `redi config show` and of the
key table in docs/config.md (`redi config show --markdown`; a test keeps the page in step). Defaults are not
repeated here: they come from the dataclasses in redi/config.py."""
from __future__ import annotations

import copy
from typing import Any

from redi.backend import OPTION_KEYS
from redi.config import Config, _leaf_keys, resolve_objective

ALL = "all"  # the core reads it, whatever the backend

_STAGE = {
    "learning_rate": ("peak learning rate (linear warmup, then linear decay to 0)", ALL),
    "batch_size": ("global batch: sequences (sft) or pairs (pairs) per optimizer step", ALL),
    "micro_batch_size": ("at most this many sequences or pairs per forward/backward; 0: no cap", ALL),
    "micro_batch_tokens": ("at most this many tokens per forward/backward (a longer row goes alone); auto: what "
                           "fits in free memory without recomputing layers; 0: no budget", ALL),
    "epochs": ("passes over the data (fractions allowed); ignored when max_steps > 0", ALL),
    "max_steps": ("optimizer steps; 0: derived from epochs (on the command line, --max-steps 0 is a dry run)", ALL),
    "warmup_ratio": ("share of the steps with linear warmup", ALL),
    "weight_decay": ("AdamW weight decay", ALL),
    "max_grad_norm": ("gradient clipping norm; 0: off", ALL),
    "max_length": ("tokens per sequence; sft rows are right-truncated, longer pairs are dropped", ALL),
    "max_prompt_length": ("drop pairs whose prompt is longer; 0: no separate limit (sft: must stay 0)", ALL),
}

KEY_DOCS: dict[str, tuple[str, str]] = {
    "model": ("HF model folder, hub name, or builtin:tiny / builtin:demo", ALL),
    "data": ("jsonl/parquet file, save_to_disk folder, hub name, `redi data pair` folder, or builtin:*", ALL),
    "output": ("run folder", ALL),
    "backend": ("cpu | cuda | mlx; empty: cuda if available, mlx on Apple silicon, else cpu", ALL),
    "stage": ("sft | pairs | both", ALL),
    "objective": ("stage 2 loss: redi | symmetric | dpo | simpo | orpo", ALL),
    "alpha": ("REDI: weight of the rejected term (authors' reinforce_rejected_coef); unset: the paper's 0.8 "
              "(symmetric: fixed at 1)", ALL),
    "beta": ("DPO/SimPO beta, ORPO's lambda; unset: the objective's default (DPO 0.001, SimPO 2, ORPO 0.1)", ALL),
    "gamma": ("SimPO target margin; unset: the paper's 1", ALL),
    "chosen_coef": ("REDI: weight of the chosen term (authors' reinforce_chosen_coef); unset: 1", ALL),
    "neg_weighting_gamma": ("REDI: rejected term times exp(gamma * its logp/len), gradient through the weight as "
                            "the authors' use_neg_weighting; 0 (unset): off", ALL),
    "neg_weighting_detached_gamma": ("REDI: the same weight, detached (not in the authors' code); 0 (unset): off", ALL),
    "seed": ("data order, model init of built-ins, sampling", ALL),
    "save_every": ("checkpoint every N optimizer steps; 0: only the final model", ALL),
    "keep_last": ("checkpoints kept (oldest pruned)", ALL),
    "system_prompt": ("system turn added to conversational (message) rows; string rows ignore it", ALL),
    "precision": ("auto: bf16 autocast over fp32 weights on CUDA, fp32 elsewhere | fp32 | bf16", ALL),
    "lm_head_chunk": ("completion tokens per LM-head chunk (never full tokens x vocab logits)", ALL),
    "lora_rank": ("> 0: rank-r LoRA adapters on lora_targets in every decoder block, base frozen", ALL),
    "lora_scale": ("multiplies the adapter output (mlx-lm's scale; PEFT's lora_alpha / lora_rank)", ALL),
    "lora_dropout": ("dropout on the adapter input (training passes only)", ALL),
    "lora_dora": ("DoRA instead of LoRA", ALL),
    "lora_targets": ("comma-separated block modules; empty: every attention and MLP linear", ALL),
    "log_every": ("steps between plain progress lines when stdout is not a terminal", ALL),
    "skip_nonfinite": ("tolerate up to N steps with a non-finite loss or gradient (skipped, logged)", ALL),
    "stop_on_collapse": ("stop the run when the collapse alarm fires", ALL),
    "collapse_window": ("collapse alarm: steps averaged at the start (after warmup) and now", ALL),
    "collapse_drop": ("collapse alarm: nats/token both LogPS must have fallen by", ALL),
    "collapse_ratio": ("collapse alarm: times as far below zero as at the start both LogPS must be", ALL),
    "on_malformed": ("error | skip (skipped rows are counted and listed in data_report.json)", ALL),
    "report_to": ("trackers fed each step's metrics besides metrics.jsonl: tensorboard, wandb", ALL),
    "wandb_project": ("W&B project (report_to: wandb)", ALL),
    "wandb_run_name": ("W&B run name; empty: the output folder's name", ALL),
    "packing": ("true: padding-free rows with a document mask; false: right-padded batches; auto: packed on CUDA and "
                "under torchrun, padded on a CPU (faster there, docs/speed.md); MLX always pads", ALL),
    "activation_checkpointing": ("none | full | N (layers) | auto | auto:GB (a memory cap)", ALL),
    "compile": ("false | true | auto: torch.compile the decoder layers (auto: CUDA) / mx.compile (MLX: true); "
                "eager, with one warning line, if compiling fails", ALL),
    "optim_state_dtype": ("AdamW moments: fp32 | bf16 (4 bytes/param less)", ALL),
    **{f"{stage}.{key}": (f"{stage}: {what}", who) for stage in ("sft", "pairs") for key, (what, who) in _STAGE.items()},
    "model_config": ("edits to the model's config.json, applied at load and saved into every checkpoint "
                     "(the paper's: rope_theta 300000, max_position_embeddings 32768)", ALL),
    "pairs.learning_rate": ("pairs: peak learning rate (linear warmup, then linear decay to 0); unset: the "
                            "objective's paper value (redi 1e-6, symmetric 2e-7, dpo 2e-7, simpo 5e-7)", ALL),
    "task": ("free-form section of the built-in demo task (problem generator, evaluation)", "demo"),
}


def key_rows(cfg: Config | None = None) -> list[tuple[str, Any, Any, str, str]]:
    """(key, value in ``cfg``, default, what, read by) for every key, in the dataclasses' order."""
    # Resolved as a run resolves them: unset objective hyperparameters show the objective's paper values.
    values = _leaf_keys(resolve_objective(copy.deepcopy(cfg or Config())))
    defaults = _leaf_keys(resolve_objective(Config()))
    missing = sorted(set(defaults) - set(KEY_DOCS))
    if missing:  # a new key must be documented here; the tests catch this before a user does
        raise KeyError(f"config keys without a line in redi/config_docs.py: {', '.join(missing)}")
    return [(key, values[key], defaults[key], KEY_DOCS[key][0], _readers(key, KEY_DOCS[key][1])) for key in defaults]


def _readers(key: str, default: str) -> str:
    """Backend options are read by the backends that list them in redi.backend.OPTION_KEYS; the rest by the core."""
    readers = [name for name, keys in OPTION_KEYS.items() if key in keys]
    return ", ".join(readers) if readers else default


def _show(value: Any) -> str:
    if value is None:  # alpha, beta, gamma, pairs.learning_rate: the objective's paper value (PAPER_DEFAULTS)
        return "paper-default"
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return "{...}" if value else "{}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def markdown_table() -> str:
    lines = ["| key | default | what it does | read by |", "|---|---|---|---|"]
    for key, _, default, what, who in key_rows():
        lines.append(f"| `{key}` | `{_show(default)}` | {what} | {who} |")
    return "\n".join(lines) + "\n"


def text_listing(cfg: Config) -> str:
    """One line per key: resolved value, and the default where it differs (marked *)."""
    rows = key_rows(cfg)
    width = max(len(key) for key, *_ in rows)
    out = []
    for key, value, default, _, _ in rows:
        changed = value != default
        note = f"  (default {_show(default)})" if changed else ""
        out.append(f"{'*' if changed else ' '} {key:<{width}}  {_show(value)}{note}")
    return "\n".join(out) + "\n"

