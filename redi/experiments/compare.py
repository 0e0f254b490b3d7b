"""`redi compare`: the paper's objective ablation in one command (Table 2, Figures 3-7).

From named SFT checkpoints (``sft_checkpoints``; each arm picks its ``start``) and one pair set, stage 2 runs
once per arm (and per seed) with the same data order, steps and evaluation schedule; each arm is evaluated
with `redi eval` on the named benchmarks every ``eval_every`` steps and its best checkpoint is reported, beside
the paper's numbers when the arm gives them (``paper:``). Every file, evaluation caches included, stays under
the output folder; nothing is written into a model folder the user passed in. Outputs: compare.md,
compare.csv, compare.json and PNG plots. Finished arms and finished evaluations are reused on a rerun.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from redi.atomic import write_text_atomic
from redi.config import OBJECTIVE_KEYS, Config, apply_mapping, continued_sft_config, load_config, validate
from redi.errors import UserError
from redi.recipes import resolve_recipe
from redi.model_dir import check_model_folder
from redi.objectives import PAIR_OBJECTIVES
from redi.gguf import model_folder
from redi.training.guards import CollapseDetector
from redi.training.metrics import read_metrics

ARM_KEYS = {"name", "objective", *OBJECTIVE_KEYS, "learning_rate", "start", "data", "paper"}
COMPARE_KEYS = {"recipe", "sft_checkpoint", "sft_checkpoints", "eval_every", "seeds", "arms", "eval", "overrides"}
TRAINED_START = "sft"  # the start model's name when the grid trains stage 1 itself (no sft_checkpoint given)


@dataclass
class Arm:
    name: str
    objective: str  # redi | symmetric | dpo | simpo | sft (continued SFT on the chosen traces: the control)
    learning_rate: float | None  # None: the objective's paper value (redi.objectives.PAPER_DEFAULTS)
    params: dict[str, float] = field(default_factory=dict)
    start: str = ""  # a key of CompareConfig.starts; "": the first
    paper: dict[str, float] = field(default_factory=dict)  # the paper's pass@1 (%) per benchmark, and "avg"
    data: str = ""  # this arm's pair set (a `redi data pair` folder or file); "": the grid's data


@dataclass
class Start:
    """An SFT model the arms start from: a folder the user passed in (never written into), or stage 1."""

    name: str
    path: str  # "": trained by the grid into OUTPUT/sft
    paper: dict[str, float] = field(default_factory=dict)


@dataclass
class CompareConfig:
    recipe: Config
    arms: list[Arm]
    eval_every: int = 25
    seeds: int = 1
    starts: list[Start] = field(default_factory=lambda: [Start(TRAINED_START, "")])
    eval: dict = field(default_factory=dict)

    def start_of(self, arm: Arm) -> Start:
        return next((s for s in self.starts if s.name == arm.start), self.starts[0])


def _resolve(path: str, base: Path) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    if (base / p).exists():
        return base / p
    return resolve_recipe(path, what=f"recipe (looked beside {base} and in the shipped recipes)")


def apply_sets(raw: dict, sets: list[str]) -> dict:
    """``--set KEY=VALUE`` on a compare grid: a dotted path into the grid's YAML (``eval.benchmarks=[b.jsonl]``,
    ``sft_checkpoints.sft-3ep.path=DIR``), or any recipe key, which joins ``overrides`` (``pairs.max_steps=4``)."""
    raw = copy.deepcopy(raw)
    for item in sets:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got '{item}'")
        key, text = (part.strip() for part in item.split("=", 1))
        value = yaml.safe_load(text) if text else ""
        parts = key.split(".")
        if parts[0] not in COMPARE_KEYS or parts[0] == "overrides":
            raw.setdefault("overrides", {})[key.removeprefix("overrides.")] = value
            continue
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {"path": node[part]} if isinstance(node.get(part), str) else {}
            node = node[part]
        node[parts[-1]] = value
    return raw


def load_compare_config(path: Path, sets: list[str] | None = None) -> CompareConfig:
    path = resolve_recipe(path, what="compare config")  # a file, or a shipped grid by name (paper/compare)
    raw = apply_sets(yaml.safe_load(path.read_text()) or {}, sets or [])
    unknown = set(raw) - COMPARE_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(COMPARE_KEYS))}")
    recipe = load_config(_resolve(raw.get("recipe", "demo.yaml"), path.parent))
    apply_mapping(recipe, raw.get("overrides", {}), f"{path} overrides")
    starts = _starts(raw, path)
    arms = []
    for i, a in enumerate(raw.get("arms") or []):
        bad = set(a) - ARM_KEYS
        if bad or "name" not in a or "objective" not in a:
            raise UserError(f"{path} arm {i + 1}: needs name and objective; unknown keys: {', '.join(sorted(bad)) or 'none'}")
        if a.get("start") and a["start"] not in {s.name for s in starts}:
            raise UserError(f"{path} arm {i + 1}: start '{a['start']}' is not a key of sft_checkpoints")
        params = {k: float(a[k]) for k in OBJECTIVE_KEYS if k in a}
        lr = a.get("learning_rate", recipe.pairs.learning_rate)
        arms.append(Arm(str(a["name"]), str(a["objective"]), None if lr is None else float(lr), params,
                        str(a.get("start") or ""), _paper_numbers(a.get("paper"), f"{path} arm {i + 1}"),
                        str(a.get("data") or "")))
    if not arms:
        raise UserError(f"{path}: no arms")
    if len({a.name for a in arms}) != len(arms):
        raise UserError(f"{path}: arm names must be unique")
    cc = CompareConfig(recipe, arms, int(raw.get("eval_every", 25)), int(raw.get("seeds", 1)), starts,
                       dict(raw.get("eval") or {}))
    check_grid(cc, path)
    return cc


ARM_OBJECTIVES = (*PAIR_OBJECTIVES, "sft")


def check_grid(cc: CompareConfig, path: Path) -> None:
    """Every arm's config, checked before any arm trains (an unknown objective in arm 3 used to surface only
    after arms 1 and 2 had trained)."""
    for i, arm in enumerate(cc.arms):
        where = f"{path} arm {i + 1} ({arm.name})"
        if arm.objective not in ARM_OBJECTIVES:
            raise UserError(f"{where}: unknown objective '{arm.objective}'; valid objectives: "
                            f"{', '.join(ARM_OBJECTIVES)}")
        try:
            arm_config(cc, arm, cc.recipe.seed, cc.recipe.model, cc.recipe.data, Path(cc.recipe.output))
        except UserError as err:
            raise UserError(f"{where}: {err}") from None


def _paper_numbers(raw: Any, where: str) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) for v in raw.values()):
        raise UserError(f"{where}: paper must map benchmark names (and avg) to numbers in %")
    return {str(k): float(v) for k, v in raw.items()}


def _starts(raw: dict, path: Path) -> list[Start]:
    """``sft_checkpoints: {name: folder | {path, paper}}``, or the older single ``sft_checkpoint: folder``."""
    named = raw.get("sft_checkpoints")
    if named is None:
        return [Start(TRAINED_START, str(raw.get("sft_checkpoint") or ""))]
    if not isinstance(named, dict) or not named:
        raise UserError(f"{path}: sft_checkpoints must map names to model folders")
    starts = []
    for name, value in named.items():
        entry = value if isinstance(value, dict) else {"path": value}
        if not entry.get("path"):
            raise UserError(f"{path}: sft_checkpoints.{name} needs a path")
        starts.append(Start(str(name), str(entry["path"]), _paper_numbers(entry.get("paper"), f"{path} sft_checkpoints.{name}")))
    return starts


# ------------------------------------------------------------------------------------------- evaluation


def benchmarks_of(ev: dict) -> list[str]:
    """``eval.benchmarks`` (a list of names or files) or the older single ``eval.benchmark``."""
    names = ev.get("benchmarks") or ([ev["benchmark"]] if ev.get("benchmark") else [])
    return [str(b) for b in ([names] if isinstance(names, str) else names)]


def make_evaluator(cc: CompareConfig, data_dir: Path) -> Callable[[Path, Path], dict]:
    """(model_dir, cache_dir) -> {"accuracy", "sem", "benchmarks": {name: {"accuracy", "sem"}}}: the demo's
    evaluation on built-in data, else `redi eval`'s pipeline, cached under cache_dir keyed by its settings."""
    cfg, ev = cc.recipe, cc.eval
    if (data_dir / "eval.jsonl").exists() and cfg.data.startswith("builtin:demo"):
        from redi.experiments.demo import EvalSettings, evaluate_model

        problems = [json.loads(x) for x in (data_dir / "eval.jsonl").read_text().splitlines() if x.strip()]
        problems = problems[: int(ev.get("problems", cfg.task.get("eval_problems", len(problems))))]
        settings = EvalSettings(int(ev.get("samples", 2)), float(ev.get("temperature", 0.6)), float(ev.get("top_p", 0.95)),
                                int(ev.get("max_new_tokens", cfg.task.get("eval_max_new_tokens", 128))))

        def demo_eval(model_dir: Path, cache_dir: Path) -> dict:
            r = evaluate_model(model_dir, problems, cfg, settings)
            return {"accuracy": r["sampled_accuracy"], "sem": r["sampled_accuracy_sem"],
                    "greedy_accuracy": r["greedy_accuracy"], "problems": len(problems), "samples": settings.samples}

        demo_eval.key = _digest({"demo": len(problems), **settings.__dict__})  # type: ignore[attr-defined]
        return demo_eval
    benchmarks = benchmarks_of(ev)
    if not benchmarks:
        raise UserError("compare needs held-out problems: set eval.benchmarks (names or jsonl/parquet files with "
                        "problem and answer)")
    from dataclasses import asdict, fields

    from redi.evaluation.pipeline import EvalSettings as GenericSettings
    from redi.evaluation.pipeline import evaluate

    # Any `redi eval` setting can be given under eval: (the engine too, where the pipeline has one);
    # compare's defaults are cheaper than `redi eval`'s: 4 samples of 1,024 tokens on the raw problem.
    known = {f.name for f in fields(GenericSettings)}
    unknown = sorted(set(ev) - known - {"benchmark", "benchmarks", "problems"})
    if unknown:
        raise UserError(f"unknown eval key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known | {'benchmarks', 'problems'}))}")
    chosen = {"samples": 4, "max_new_tokens": 1024, "force_think": False, "system_prompt": None, "template": "raw",
              **{k: v for k, v in ev.items() if k in known}, "seed": cfg.seed, "limit": int(ev.get("problems", 0))}
    settings = GenericSettings(**chosen)
    digest = _digest({"benchmarks": benchmarks, "backend": cfg.backend,
                      **{k: v for k, v in asdict(settings).items() if k != "workers"}})  # workers: grading only

    def generic_eval(model_dir: Path, cache_dir: Path) -> dict:
        out = cache_dir / f"eval-{digest}"
        results = evaluate(str(model_dir), benchmarks, str(out), settings, cfg.backend)
        per = {name: {"accuracy": r["pass@1"], "sem": r["sem"] or 0.0, "problems": r["problems"]}
               for name, r in results.items()}
        accuracy = float(np.mean([r["accuracy"] for r in per.values()]))
        # The average's SEM with the benchmarks' sampling errors independent.
        sem = float(np.sqrt(sum(r["sem"] ** 2 for r in per.values()))) / len(per)
        return {"accuracy": accuracy, "sem": sem, "benchmarks": per, "samples": settings.samples}

    generic_eval.key = digest  # type: ignore[attr-defined]
    return generic_eval


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------- one arm


def arm_config(cc: CompareConfig, arm: Arm, seed: int, sft_model: str, data: str, out: Path) -> Config:
    cfg = copy.deepcopy(cc.recipe)
    data = arm.data or data
    cfg.model, cfg.data, cfg.output, cfg.seed = sft_model, data, str(out), seed
    cfg.save_every, cfg.keep_last = cc.eval_every, 0  # every eval point is a checkpoint, all kept
    # Each arm is its own tracker run (report_to comes from the recipe or the compare config's overrides).
    cfg.wandb_run_name = "-".join(x for x in (cc.recipe.wandb_run_name, arm.name, f"seed{seed}") if x)
    if arm.objective == "sft":
        cfg = continued_sft_config(cfg)  # the control for extra training
        cfg.data = str(Path(data) / "pairs.jsonl") if Path(data, "pairs.jsonl").exists() else data
    else:
        # Unset hyperparameters take the objective's paper values (validate resolves them).
        cfg.stage, cfg.objective = "pairs", arm.objective
        for key in OBJECTIVE_KEYS:
            setattr(cfg, key, arm.params.get(key))
    if arm.learning_rate is not None or arm.objective != "sft":
        (cfg.sft if arm.objective == "sft" else cfg.pairs).learning_rate = arm.learning_rate
    return validate(cfg)


def run_arm(cc: CompareConfig, arm: Arm, seed: int, sft_model: str, data: str, out: Path,
            evaluate: Callable[[Path, Path], dict], base_eval: dict) -> dict:
    from redi.training.api import train

    done, key = out / "arm_result.json", getattr(evaluate, "key", "")
    previous = json.loads(done.read_text()) if done.exists() else None
    if previous and previous.get("eval_key") == key:
        return previous
    t0 = time.time()
    cfg = arm_config(cc, arm, seed, sft_model, data, out)
    if previous is None:  # trained arms are only re-evaluated when the evaluation settings changed
        if out.exists():
            import shutil

            shutil.rmtree(out)  # an arm interrupted midway restarts cleanly
        train(cfg)
    records = read_metrics(out / "metrics.jsonl")
    evals = [{"step": 0, **base_eval}]
    for ckpt in sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        evals.append({"step": int(ckpt.name.split("-")[1]), **evaluate(ckpt, out / "evals" / ckpt.name)})
    evals.append({"step": records[-1]["step"], **evaluate(out / "final", out / "evals" / "final")})
    with (out / "evals.jsonl").open("w") as fh:
        fh.writelines(json.dumps(e) + "\n" for e in evals)
    detector = CollapseDetector.from_config(cc.recipe, ignore_before=int(np.ceil(cfg.pairs.warmup_ratio * len(records))))
    collapse_steps = [r["step"] for r in records if detector.update(r)]
    peak = max(evals, key=lambda e: e["accuracy"])
    last = records[-1]
    resolved = {k: v for k, v in cfg.objective_params().items()} if arm.objective != "sft" else {}
    result = {
        "arm": arm.name, "seed": seed, "start": cc.start_of(arm).name, "objective": arm.objective,
        "learning_rate": (cfg.sft if arm.objective == "sft" else cfg.pairs).learning_rate, **resolved,
        "final_accuracy": evals[-1]["accuracy"], "final_sem": evals[-1]["sem"],
        "peak_accuracy": peak["accuracy"], "peak_sem": peak["sem"], "peak_step": peak["step"],
        "peak_benchmarks": peak.get("benchmarks", {}), "final_benchmarks": evals[-1].get("benchmarks", {}),
        "final_chosen_logps": last.get("logps/chosen_normalized"),
        "final_rejected_logps": last.get("logps/rejected_normalized"),
        "max_update_norm": max(r["update_norm"] for r in records if r.get("update_norm") is not None),
        "collapse": bool(collapse_steps), "first_collapse_step": collapse_steps[0] if collapse_steps else None,
        "wall_time_s": round(time.time() - t0 + (previous or {}).get("wall_time_s", 0.0), 1), "eval_key": key,
    }
    write_text_atomic(done, json.dumps(result, indent=2))  # its presence marks the arm done
    return result


def start_models(cc: CompareConfig, out: Path) -> tuple[dict[str, str], str]:
    """({start name: SFT model dir}, data dir): the configured checkpoints, or stage 1 trained once into OUT/sft."""
    from redi.builtin import materialise_data
    from redi.training.api import train

    data = materialise_data(cc.recipe.data, out, cc.recipe.seed, cc.recipe.task)
    models = {}
    for start in cc.starts:
        if start.path:
            check_model_folder(start.path, f"sft_checkpoints.{start.name}")  # a run folder: "did you mean RUN/final?"
            path = model_folder(start.path)  # a .gguf file: its converted HF folder
            if not Path(path, "config.json").exists():
                raise UserError(f"sft checkpoint {start.path} ({start.name}) is not a model directory (no config.json)")
            models[start.name] = path
            continue
        sft_dir = out / "sft"
        if not (sft_dir / "final" / "config.json").exists():
            if sft_dir.exists():
                import shutil

                shutil.rmtree(sft_dir)
            cfg = copy.deepcopy(cc.recipe)
            cfg.stage, cfg.data, cfg.output = "sft", data, str(sft_dir)
            train(validate(cfg))
        models[start.name] = str(sft_dir / "final")
    return models, data
