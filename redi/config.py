"""The run configuration: two small dataclasses, YAML in, YAML out, ``--set key=value`` overrides.

Keys are dotted paths (``sft.learning_rate``, ``pairs.batch_size``). Unknown keys are refused with the
closest valid key suggested; wrong types and out-of-range values are refused with the key named.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from redi.atomic import write_text_atomic
from redi.authors_keys import AUTHORS_ALIASES, AUTHORS_SWITCH, set_use_neg_weighting, switch_last
from redi.errors import UserError
from redi.layer_checkpointing import micro_batch_tokens_value
from redi.lora import spec_from_config
from redi.option_checks import check_memory_options, check_precision, compile_mode, packing_mode
from redi.objectives import OBJECTIVE_PARAMS, PAIR_OBJECTIVES, PAPER_DEFAULTS
from redi.recipes import resolve_recipe

BACKENDS = ("cpu", "cuda", "mlx")
STAGES = ("sft", "pairs", "both")


@dataclass
class StageConfig:
    """Optimisation settings of one stage. ``batch_size`` is global: sequences for SFT, pairs for stage 2."""

    learning_rate: float | None = None  # None (stage 2): the objective's paper value (PAPER_DEFAULTS)
    batch_size: int = 32
    micro_batch_size: int = 0  # rows per micro-batch at most; 0: no cap (micro_batch_tokens decides)
    micro_batch_tokens: str = "auto"  # tokens per micro-batch at most: auto (from free memory) | N | 0 (no budget)
    epochs: float = 1.0
    max_steps: int = 0  # 0: derived from epochs
    warmup_ratio: float = 0.1
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    max_length: int = 19800
    max_prompt_length: int = 0  # 0: no separate prompt limit


REPORT_TARGETS = ("tensorboard", "wandb")  # report_to: the trackers redi.training.report_to can feed


@dataclass
class Config:
    model: str = "builtin:tiny"
    data: str = "builtin:tiny"
    output: str = "runs/redi"
    backend: str = ""  # empty: cuda when available, mlx on Apple silicon, else cpu
    stage: str = "both"
    objective: str = "redi"
    # None: the objective's paper value (redi.objectives.PAPER_DEFAULTS); keys an objective does not use stay
    # unset and are left out of the run's config.yaml.
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    # REDI's other options in the authors' code (redi.objectives.redi_loss): the chosen term's coefficient and
    # the negative weighting exp(gamma * S_l/L_l) of the rejected term, gradient through it or detached.
    chosen_coef: float | None = None
    neg_weighting_gamma: float | None = None
    neg_weighting_detached_gamma: float | None = None
    seed: int = 42
    save_every: int = 0  # optimizer steps between checkpoints; 0: only the final model
    keep_last: int = 2
    system_prompt: str = ""  # injected as a system turn for conversational rows when set
    precision: str = "auto"  # auto: bf16 autocast over fp32 weights on CUDA, fp32 elsewhere
    lm_head_chunk: int = 1024  # completion tokens per LM-head chunk; never full [tokens x vocab] logits
    # LoRA/DoRA (redi/lora.py; PEFT on torch, mlx-lm's tuner on MLX): base frozen, adapters trained in fp32.
    lora_rank: int = 0  # >0 trains rank-r adapters on lora_targets in every decoder block
    lora_scale: float = 20.0  # multiplies the adapter output (mlx-lm's scale; PEFT's lora_alpha / lora_rank)
    lora_dropout: float = 0.0  # dropout on the adapter input (0, as every other dropout is off)
    lora_dora: bool = False  # DoRA instead of LoRA
    lora_targets: str = ""  # comma-separated block modules; empty: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
    log_every: int = 10  # steps between plain progress lines when stdout is not a terminal
    skip_nonfinite: int = 0  # tolerate up to N steps with a non-finite loss or gradient (skipped, logged)
    stop_on_collapse: bool = False
    # Collapse alarm (redi/training/guards.py): both LogPS, averaged over the last collapse_window steps,
    # sit collapse_drop nats/token below and collapse_ratio times as far below zero as over the first
    # collapse_window steps after warmup.
    collapse_window: int = 10
    collapse_drop: float = 0.1
    collapse_ratio: float = 2.0
    on_malformed: str = "error"  # error | skip (skipped rows are counted and listed in data_report.json)
    # Trackers fed each step's metrics besides metrics.jsonl: tensorboard (<output>/tensorboard/), wandb.
    report_to: list[str] = field(default_factory=list)
    wandb_project: str = "redi"
    wandb_run_name: str = ""  # empty: the output folder's name
    # Backend speed and memory (docs/cuda.md, docs/mlx.md); which backend reads which: redi.backend.OPTION_KEYS.
    packing: str = "auto"  # true | false | auto (CUDA and torchrun: padding-free rows with a document mask; CPU: padded)
    activation_checkpointing: str = "auto"  # none | full | N (layers) | auto | auto:GB (a memory cap, CUDA)
    compile: str = "false"  # false | true | auto (on where measured to pay: CUDA); FlexAttention compiles regardless
    optim_state_dtype: str = "fp32"  # AdamW moments: fp32 (torch's fused AdamW) or bf16 (4 bytes/param less)
    sft: StageConfig = field(default_factory=lambda: StageConfig(learning_rate=5e-5, batch_size=128, epochs=5, max_length=32768))
    pairs: StageConfig = field(default_factory=lambda: StageConfig(max_prompt_length=800))
    # Edits to the model's config.json applied at load on every backend and written into every checkpoint,
    # e.g. the paper's {rope_theta: 300000, max_position_embeddings: 32768} (redi-spec.md §10, pitfall 8).
    model_config: dict = field(default_factory=dict)
    # Free-form section owned by the built-in demo task (problem generator, error model, evaluation).
    task: dict = field(default_factory=dict)

    def objective_params(self) -> dict[str, float]:
        """The hyperparameters the objective uses (after ``resolve_objective``: the values the run trains with)."""
        return {k: getattr(self, k) for k in OBJECTIVE_PARAMS.get(self.objective, {}) if getattr(self, k) is not None}


OBJECTIVE_KEYS = ("alpha", "beta", "gamma", "chosen_coef", "neg_weighting_gamma", "neg_weighting_detached_gamma")
# Shown in the run's objective line only where they differ from the paper's (all are off or neutral there).
_QUIET_KEYS = ("chosen_coef", "neg_weighting_gamma", "neg_weighting_detached_gamma")


def resolve_objective(cfg: Config) -> Config:
    """Fill stage 2's unset learning rate and the objective's unset alpha/beta/gamma with the paper's values."""
    paper = PAPER_DEFAULTS.get(cfg.objective, PAPER_DEFAULTS["redi"])
    if cfg.pairs.learning_rate is None:
        cfg.pairs.learning_rate = paper["learning_rate"]
    if cfg.sft.learning_rate is None:
        cfg.sft.learning_rate = 5e-5  # the paper's SFT (redi-spec.md §3.1)
    if cfg.beta == 0:  # run folders before 0.2 wrote beta 0.0 for "the paper's value"
        cfg.beta = None
    for key in OBJECTIVE_KEYS:
        if key in paper and getattr(cfg, key) is None:
            setattr(cfg, key, paper[key])
    return cfg


def objective_line(cfg: Config) -> str:
    """The run's stage-2 hyperparameters in one line, each marked where it differs from the paper's."""
    paper = PAPER_DEFAULTS.get(cfg.objective, {})
    values = {"lr": (cfg.pairs.learning_rate, paper.get("learning_rate"))}
    values.update({k: (v, paper.get(k)) for k, v in cfg.objective_params().items()
                   if k not in _QUIET_KEYS or v != paper.get(k)})
    parts = [f"{k} {v:g}" + ("" if p is None or p == v else f" (paper: {p:g})") for k, (v, p) in values.items()]
    if cfg.objective == "symmetric":
        parts.append("alpha 1 (fixed)")
    return f"objective {cfg.objective}: " + ", ".join(parts)


def _leaf_keys(obj: Any, prefix: str = "") -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.update(_leaf_keys(value, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = value
    return keys


def valid_keys() -> list[str]:
    return sorted(_leaf_keys(Config()))


def _unknown_key(key: str, where: str) -> UserError:
    # The same name in another place first (pairs.alpha -> alpha, a top-level key), then spelling.
    leaf = key.rsplit(".", 1)[-1]
    moved = sorted((k for k in valid_keys() if k.rsplit(".", 1)[-1] == leaf and k != key), key=lambda k: k.count("."))
    close = moved[:1] or difflib.get_close_matches(key, valid_keys() + ["sft", "pairs"], n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid_keys())}"
    return UserError(f"unknown config key '{key}' in {where}{hint}")


def _coerce(key: str, raw: Any, target_type: Any, where: str) -> Any:
    options = [t for t in getattr(target_type, "__args__", ()) if t is not type(None)]
    if options and len(options) < len(target_type.__args__):  # Optional[X]: null or empty means unset
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "null", "none", "~")):
            return None
        target_type = options[0]
    if target_type is dict:
        if not isinstance(raw, dict):
            raise UserError(f"config key '{key}' in {where} must be a mapping, got {raw!r}")
        return raw
    if isinstance(raw, str) and target_type is not str:
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError:
            pass
    if target_type == list[str]:
        items = raw.split(",") if isinstance(raw, str) else raw  # --set report_to=tensorboard,wandb
        if isinstance(items, list) and all(isinstance(x, str) for x in items):
            return [x.strip() for x in items if x.strip()]
        raise UserError(f"config key '{key}' in {where} must be a list of names, got {raw!r}")
    try:
        if target_type is bool:
            if isinstance(raw, bool):
                return raw
            raise ValueError
        if target_type is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if target_type is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if target_type is str:
            return "" if raw is None else str(raw)
    except (TypeError, ValueError):
        pass
    raise UserError(f"config key '{key}' in {where} must be {target_type.__name__}, got {raw!r}")


def _set(cfg: Config, key: str, raw: Any, where: str) -> None:
    key = AUTHORS_ALIASES.get(key, key)
    if key == AUTHORS_SWITCH:
        set_use_neg_weighting(cfg, _coerce(key, raw, bool, where))
        return
    parts = key.split(".")
    if len(parts) == 2 and parts[0] in ("model_config", "task"):  # one entry of a free-form mapping
        value = yaml.safe_load(raw) if isinstance(raw, str) else raw
        getattr(cfg, parts[0])[parts[1]] = value
        return
    target: Any = cfg
    for part in parts[:-1]:
        sub = getattr(target, part, None) if part in {f.name for f in dataclasses.fields(target)} else None
        if not dataclasses.is_dataclass(sub):
            raise _unknown_key(key, where)
        target = sub
    names = {f.name for f in dataclasses.fields(target)}
    if parts[-1] not in names:
        raise _unknown_key(key, where)
    hint = get_type_hints(type(target))[parts[-1]]
    if dataclasses.is_dataclass(getattr(target, parts[-1])):
        if not isinstance(raw, dict):
            raise UserError(f"config key '{key}' in {where} must be a mapping")
        for sub_key, sub_value in raw.items():
            _set(cfg, f"{key}.{sub_key}", sub_value, where)
        return
    value = _coerce(key, raw, hint, where)
    if key in PATH_KEYS and isinstance(value, str) and value.startswith("~"):
        value = os.path.expanduser(value)  # YAML is not a shell: every reader of the key gets the real path
    setattr(target, parts[-1], value)


PATH_KEYS = ("model", "data", "output")


# Keys of earlier versions that no longer do anything: a run folder's saved config.yaml may still hold them.
RETIRED_KEYS = {"collapse_growth": "the collapse alarm no longer reads the update norm",
                "collapse_severe_drop": "the collapse alarm has one rule now"}


def apply_mapping(cfg: Config, mapping: dict, where: str) -> Config:
    for key, value in switch_last(list(mapping.items())):
        if key in RETIRED_KEYS:
            print(f"warning: {where}: key '{key}' is ignored ({RETIRED_KEYS[key]})", file=sys.stderr)
            continue
        _set(cfg, str(key), value, where)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    items = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        items.append((key.strip(), value))
    for key, value in switch_last(items):
        _set(cfg, key, value, "--set")
    return cfg


def load_config(path: str | Path | None) -> Config:
    cfg = Config()
    if path is None:
        return cfg
    p = resolve_recipe(path)  # a file, or a shipped recipe by name (paper/sft)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {p}{where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p}: top level must be a mapping of keys")
    return apply_mapping(cfg, data, str(p))


def validate(cfg: Config) -> Config:
    """Check every key and resolve the objective's unset hyperparameters (``resolve_objective``)."""
    if cfg.backend and cfg.backend not in BACKENDS:
        raise UserError(f"unknown backend '{cfg.backend}'; valid backends: {', '.join(BACKENDS)}")
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage '{cfg.stage}'; valid stages: {', '.join(STAGES)}")
    if cfg.objective not in PAIR_OBJECTIVES:
        raise UserError(f"unknown objective '{cfg.objective}'; valid objectives: {', '.join(PAIR_OBJECTIVES)}")
    resolve_objective(cfg)
    if cfg.lora_rank < 0:
        raise UserError(f"config key 'lora_rank' is out of range: {cfg.lora_rank!r}")
    spec_from_config(cfg)  # lora_dora without a rank, lora_dropout out of range
    check_precision(cfg.precision, cfg.backend)
    if cfg.on_malformed not in ("error", "skip"):
        raise UserError(f"config key 'on_malformed' must be error or skip, got '{cfg.on_malformed}'")
    if cfg.beta is not None and cfg.beta <= 0:
        raise UserError(f"config key 'beta' must be positive, got {cfg.beta!r}")
    if cfg.neg_weighting_gamma and cfg.neg_weighting_detached_gamma and cfg.objective == "redi":
        raise UserError("config keys 'neg_weighting_gamma' and 'neg_weighting_detached_gamma' are two variants of "
                        "one weight (gradient through it, or detached); set only one")
    if cfg.alpha is not None and not 0.0 <= cfg.alpha <= 1.0:
        print(f"warning: alpha={cfg.alpha} is outside [0, 1], the range the paper studies", file=sys.stderr)
    check_memory_options(cfg.activation_checkpointing, cfg.optim_state_dtype)
    compile_mode(cfg.compile)
    packing_mode(cfg.packing)
    if cfg.collapse_window < 1:
        raise UserError(f"config key 'collapse_window' must be at least 1, got {cfg.collapse_window}")
    for name in ("sft", "pairs"):
        s: StageConfig = getattr(cfg, name)
        checks = {
            "learning_rate": s.learning_rate > 0,
            "batch_size": s.batch_size >= 1,
            "micro_batch_size": s.micro_batch_size >= 0,
            "epochs": s.epochs > 0,
            "max_steps": s.max_steps >= 0,
            "warmup_ratio": 0.0 <= s.warmup_ratio < 1.0,
            "weight_decay": s.weight_decay >= 0,
            "max_grad_norm": s.max_grad_norm >= 0,
            "max_length": s.max_length >= 2,
            "max_prompt_length": s.max_prompt_length >= 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise UserError(f"config key '{name}.{key}' is out of range: {getattr(s, key)!r}")
        micro_batch_tokens_value(s.micro_batch_tokens, f"{name}.micro_batch_tokens")
    unknown = [t for t in cfg.report_to if t not in REPORT_TARGETS]
    if unknown:
        raise UserError(f"config key 'report_to': unknown target '{unknown[0]}'; choose from: {', '.join(REPORT_TARGETS)}")
    if cfg.sft.max_prompt_length:
        raise UserError("config key 'sft.max_prompt_length' does nothing: stage 1 keeps every prompt and right-"
                        "truncates rows at sft.max_length; the prompt limit is pairs.max_prompt_length")
    for key in ("save_every", "keep_last", "lm_head_chunk", "log_every", "skip_nonfinite", "collapse_window",
                "collapse_drop", "collapse_ratio"):
        if getattr(cfg, key) < (1 if key in ("lm_head_chunk", "log_every", "collapse_ratio") else 0):
            raise UserError(f"config key '{key}' is out of range: {getattr(cfg, key)!r}")
    return cfg


def continued_sft_config(cfg: Config) -> Config:
    """The control for extra training: SFT on the pairs' chosen traces with stage 2's exact settings. Same
    examples, seed and batch size, hence the same batches in the same order as the pair run (the core's order
    is a function of seed, step and example count); only the loss differs (no negatives). The caller points
    ``data`` at the pairs (an SFT stage on a pairs file trains on its chosen traces)."""
    control = copy.deepcopy(cfg)
    control.stage = "sft"
    control.sft = copy.deepcopy(cfg.pairs)
    control.sft.max_prompt_length = 0  # a pairs-only setting
    return control


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def resolved_dict(cfg: Config, backend: str = "") -> dict:
    """What config.yaml holds: the values the run uses, without the keys its objective does not use."""
    data = to_dict(cfg)
    if backend:
        data["backend"] = backend
    used = OBJECTIVE_PARAMS.get(cfg.objective, {}) if cfg.stage != "sft" else {}
    for key in OBJECTIVE_KEYS:
        if key not in used:
            data.pop(key)
    if cfg.stage == "sft":
        data.pop("objective")
    if not data["model_config"]:
        data.pop("model_config")
    return data


def dump(cfg: Config, path: str | Path, backend: str = "") -> None:
    write_text_atomic(path, yaml.safe_dump(resolved_dict(cfg, backend), sort_keys=False), point="config")
