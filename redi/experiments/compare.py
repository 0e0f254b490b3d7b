"""`redi compare`: the paper's objective ablation in one command (Table 2, Figures 3-7).

From one SFT checkpoint and one pair set, stage 2 runs once per arm (and per seed) with the same data order,
steps and evaluation schedule; each arm is evaluated on held-out problems at intervals. Outputs: compare.md,
compare.csv, compare.json and PNG plots (accuracy, chosen LogPS, rejected LogPS, update norm vs step).
Finished arms are skipped on a rerun.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from redi.config import Config, apply_mapping, load_config, validate
from redi.errors import UserError
from redi.training.guards import CollapseDetector
from redi.training.metrics import read_metrics

ARM_KEYS = {"name", "objective", "alpha", "beta", "gamma", "learning_rate"}
COMPARE_KEYS = {"recipe", "sft_checkpoint", "eval_every", "seeds", "arms", "eval", "overrides"}


@dataclass
class Arm:
    name: str
    objective: str  # redi | symmetric | dpo | simpo | sft (continued SFT on the chosen traces: the control)
    learning_rate: float
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class CompareConfig:
    recipe: Config
    arms: list[Arm]
    eval_every: int = 25
    seeds: int = 1
    sft_checkpoint: str = ""
    eval: dict = field(default_factory=dict)


def _resolve(path: str, base: Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    if (base / p).exists():
        return base / p
    from importlib.resources import files

    packaged = Path(str(files("redi.configs") / p))
    if packaged.exists():
        return packaged
    raise UserError(f"recipe '{path}' not found (looked beside {base} and in redi.configs)")


def load_compare_config(path: Path) -> CompareConfig:
    if not path.is_file():
        raise UserError(f"compare config not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - COMPARE_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(COMPARE_KEYS))}")
    recipe = load_config(_resolve(raw.get("recipe", "demo.yaml"), path.parent))
    apply_mapping(recipe, raw.get("overrides", {}), f"{path} overrides")
    arms = []
    for i, a in enumerate(raw.get("arms") or []):
        bad = set(a) - ARM_KEYS
        if bad or "name" not in a or "objective" not in a:
            raise UserError(f"{path} arm {i + 1}: needs name and objective; unknown keys: {', '.join(sorted(bad)) or 'none'}")
        params = {k: float(a[k]) for k in ("alpha", "beta", "gamma") if k in a}
        arms.append(Arm(str(a["name"]), str(a["objective"]), float(a.get("learning_rate", recipe.pairs.learning_rate)), params))
    if not arms:
        raise UserError(f"{path}: no arms")
    if len({a.name for a in arms}) != len(arms):
        raise UserError(f"{path}: arm names must be unique")
    return CompareConfig(recipe, arms, int(raw.get("eval_every", 25)), int(raw.get("seeds", 1)),
                         str(raw.get("sft_checkpoint") or ""), dict(raw.get("eval") or {}))


# ------------------------------------------------------------------------------------------- evaluation


def make_evaluator(cc: CompareConfig, data_dir: Path) -> Callable[[Path], dict]:
    """model_dir -> {"accuracy", "sem", ...}: the demo's evaluation on built-in data, else `redi eval`'s."""
    cfg, ev = cc.recipe, cc.eval
    if (data_dir / "eval.jsonl").exists() and cfg.data.startswith("builtin:demo"):
        from redi.experiments.demo import EvalSettings, evaluate_model

        problems = [json.loads(x) for x in (data_dir / "eval.jsonl").read_text().splitlines() if x.strip()]
        problems = problems[: int(ev.get("problems", cfg.task.get("eval_problems", len(problems))))]
        settings = EvalSettings(int(ev.get("samples", 2)), float(ev.get("temperature", 0.6)), float(ev.get("top_p", 0.95)),
                                int(ev.get("max_new_tokens", cfg.task.get("eval_max_new_tokens", 128))))

        def demo_eval(model_dir: Path) -> dict:
            r = evaluate_model(model_dir, problems, cfg, settings)
            return {"accuracy": r["sampled_accuracy"], "sem": r["sampled_accuracy_sem"],
                    "greedy_accuracy": r["greedy_accuracy"], "problems": len(problems), "samples": settings.samples}

        return demo_eval
    if not ev.get("benchmark"):
        raise UserError("compare needs held-out problems: set eval.benchmark (a jsonl/parquet with problem and answer)")
    from redi.evaluation.pipeline import EvalSettings as GenericSettings
    from redi.evaluation.pipeline import generate_samples, grade_samples, load_benchmark

    name, problems = load_benchmark(str(ev["benchmark"]), int(ev.get("problems", 0)))
    settings = GenericSettings(samples=int(ev.get("samples", 4)), temperature=float(ev.get("temperature", 0.6)),
                               top_p=float(ev.get("top_p", 0.95)), max_new_tokens=int(ev.get("max_new_tokens", 1024)),
                               force_think=bool(ev.get("force_think", False)), system_prompt=ev.get("system_prompt"),
                               template=str(ev.get("template", "raw")), seed=cfg.seed, workers=ev.get("workers"))

    def generic_eval(model_dir: Path) -> dict:
        from redi.training.api import load_tokenizer
        from redi.backend import make_backend

        out = model_dir.parent / f"eval-{model_dir.name}"
        out.mkdir(exist_ok=True)
        backend = make_backend(cfg.backend, cfg.seed)
        backend.load(str(model_dir), precision=cfg.precision, lm_head_chunk=cfg.lm_head_chunk)
        generate_samples(backend, load_tokenizer(str(model_dir)), name, problems, settings, out / "samples.jsonl")
        r = grade_samples(out / "samples.jsonl", settings)[name]
        return {"accuracy": r["pass@1"], "sem": r["sem"] or 0.0, "problems": r["problems"], "samples": settings.samples}

    return generic_eval


# ------------------------------------------------------------------------------------------- one arm


def arm_config(cc: CompareConfig, arm: Arm, seed: int, sft_model: str, data: str, out: Path) -> Config:
    cfg = copy.deepcopy(cc.recipe)
    cfg.model, cfg.data, cfg.output, cfg.seed = sft_model, data, str(out), seed
    cfg.save_every, cfg.keep_last = cc.eval_every, 0  # every eval point is a checkpoint, all kept
    # Each arm is its own tracker run (report_to comes from the recipe or the compare config's overrides).
    cfg.wandb_run_name = "-".join(x for x in (cc.recipe.wandb_run_name, arm.name, f"seed{seed}") if x)
    if arm.objective == "sft":
        # Continued SFT on the pairs' chosen traces with stage 2's settings: the control for extra training.
        cfg.stage, cfg.sft = "sft", copy.deepcopy(cc.recipe.pairs)
        cfg.sft.max_prompt_length = 0
        cfg.data = str(Path(data) / "pairs.jsonl") if Path(data, "pairs.jsonl").exists() else data
    else:
        cfg.stage, cfg.objective = "pairs", arm.objective
        cfg.alpha, cfg.beta, cfg.gamma = arm.params.get("alpha", 0.8), arm.params.get("beta", 0.0), arm.params.get("gamma", 1.0)
    (cfg.sft if arm.objective == "sft" else cfg.pairs).learning_rate = arm.learning_rate
    return validate(cfg)


def run_arm(cc: CompareConfig, arm: Arm, seed: int, sft_model: str, data: str, out: Path,
            evaluate: Callable[[Path], dict], base_eval: dict) -> dict:
    from redi.training.api import train

    done = out / "arm_result.json"
    if done.exists():
        return json.loads(done.read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)  # an arm interrupted midway restarts cleanly
    t0 = time.time()
    cfg = arm_config(cc, arm, seed, sft_model, data, out)
    train(cfg)
    records = read_metrics(out / "metrics.jsonl")
    evals = [{"step": 0, **base_eval}]
    for ckpt in sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        evals.append({"step": int(ckpt.name.split("-")[1]), **evaluate(ckpt)})
    evals.append({"step": records[-1]["step"], **evaluate(out / "final")})
    with (out / "evals.jsonl").open("w") as fh:
        fh.writelines(json.dumps(e) + "\n" for e in evals)
    detector = CollapseDetector(cc.recipe.collapse_window, cc.recipe.collapse_drop, cc.recipe.collapse_growth,
                                cc.recipe.collapse_severe_drop,
                                ignore_before=int(np.ceil(cfg.pairs.warmup_ratio * len(records))))
    collapse_steps = [r["step"] for r in records if detector.update(r)]
    peak = max(evals, key=lambda e: e["accuracy"])
    last = records[-1]
    result = {
        "arm": arm.name, "seed": seed, "objective": arm.objective, "learning_rate": arm.learning_rate, **arm.params,
        "final_accuracy": evals[-1]["accuracy"], "final_sem": evals[-1]["sem"],
        "peak_accuracy": peak["accuracy"], "peak_sem": peak["sem"], "peak_step": peak["step"],
        "final_chosen_logps": last.get("logps/chosen_normalized"),
        "final_rejected_logps": last.get("logps/rejected_normalized"),
        "max_update_norm": max(r["update_norm"] for r in records if r.get("update_norm") is not None),
        "collapse": bool(collapse_steps), "first_collapse_step": collapse_steps[0] if collapse_steps else None,
        "wall_time_s": round(time.time() - t0, 1),
    }
    done.write_text(json.dumps(result, indent=2))
    return result


def sft_checkpoint(cc: CompareConfig, out: Path) -> tuple[str, str]:
    """(SFT model dir, data dir): the configured checkpoint, or stage 1 trained once into OUT/sft."""
    from redi.training.api import train
    from redi.builtin import materialise_data

    data = materialise_data(cc.recipe.data, out, cc.recipe.seed, cc.recipe.task)
    if cc.sft_checkpoint:
        if not Path(cc.sft_checkpoint, "config.json").exists():
            raise UserError(f"sft_checkpoint {cc.sft_checkpoint} is not a model directory (no config.json)")
        return cc.sft_checkpoint, data
    sft_dir = out / "sft"
    if not (sft_dir / "final" / "config.json").exists():
        if sft_dir.exists():
            import shutil

            shutil.rmtree(sft_dir)
        cfg = copy.deepcopy(cc.recipe)
        cfg.stage, cfg.data, cfg.output = "sft", data, str(sft_dir)
        train(validate(cfg))
    return str(sft_dir / "final"), data
