"""`redi train`: flags override the config file, `--set` overrides both."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from redi.config import Config, apply_overrides, load_config
from redi.errors import Interrupted, UserError
from redi.objectives import PAIR_OBJECTIVES


def default_recipe() -> Path:
    """The built-in recipe `redi train` runs with no arguments (shipped inside the package)."""
    from importlib.resources import files

    root = files("redi.configs")
    for name in ("demo.yaml", "tiny.yaml"):
        if (root / name).is_file():
            return Path(str(root / name))
    raise UserError("no built-in recipe found in redi.configs; reinstall redi")


def build_config(config: Optional[Path], backend: Optional[str], stage: Optional[str], objective: Optional[str],
                 model: Optional[str], data: Optional[str], output: Optional[str], max_steps: Optional[int],
                 max_length: Optional[int], seed: Optional[int], save_every: Optional[int],
                 overrides: List[str]) -> Config:
    if config is None and model is None and data is None:
        config = default_recipe()
    cfg = load_config(config)
    flags = {"backend": backend, "stage": stage, "objective": objective, "model": model, "data": data,
             "output": output, "seed": seed, "save_every": save_every}
    for key, value in flags.items():
        if value is not None:
            setattr(cfg, key, value)
    for stage_cfg in (cfg.sft, cfg.pairs):
        if max_steps:  # 0 is the dry run (see train below), not the config's "derive from epochs"
            stage_cfg.max_steps = max_steps
        if max_length is not None:
            stage_cfg.max_length = max_length
    return apply_overrides(cfg, overrides)


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def train(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML recipe: a file, or a shipped name (paper/sft; `redi config list`)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="cpu | cuda | mlx (default: cuda if available, mlx on Apple silicon, else cpu)."),
    stage: Optional[str] = typer.Option(None, "--stage", help="sft | pairs | both.  [default: both]"),
    objective: Optional[str] = typer.Option(None, "--objective", help=" | ".join(PAIR_OBJECTIVES) + ".  [default: redi]"),
    model: Optional[str] = typer.Option(None, "--model", help="HF model directory or hub name (needs --data).  [default: the built-in demo]"),
    data: Optional[str] = typer.Option(None, "--data", help="jsonl/parquet file, save_to_disk folder, hub name, or a `redi data pair` folder."),
    output: Optional[str] = typer.Option(None, "--output", help="Run folder; must not hold a run (see --resume).  [default: runs/redi]"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps per stage (overrides epochs); 0: check the data and print the plan, train nothing."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Token limit per sequence, both stages.  [default: sft 32768, pairs 19800]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="[default: 42]"),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N optimizer steps; 0: only the final model.  [default: 0]"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its newest checkpoint."),
    force: bool = typer.Option(False, "--force", help="With --resume: accept a config that differs from the run's."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Keep only the newest K checkpoints.  [default: 2]"),
    skip_nonfinite: Optional[int] = typer.Option(None, "--skip-nonfinite", help="Tolerate up to N non-finite steps (skipped and logged).  [default: 0]"),
    stop_on_collapse: bool = typer.Option(False, "--stop-on-collapse", help="Stop when the collapse alarm fires."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config (what config.yaml will hold) and exit."),
    overrides: List[str] = typer.Option([], "--set", help="KEY=VALUE for any config key, e.g. pairs.learning_rate=1e-6."),
) -> None:
    """Train stage 1 (SFT on correct traces) and/or stage 2 (pairs with REDI, DPO, SimPO...).

    Unset flags keep the recipe's value; `redi config show` lists every key with its default."""
    from redi.training.api import train as run_train

    if resume is not None:
        from redi.training.run_folder import check_run_config

        config = config or check_run_config(resume)
        output = str(resume)
    # Nothing but presentation flags given: the demo pipeline. Any --stage means plain training instead.
    demo = config is None and model is None and data is None and resume is None and stage is None
    cfg = build_config(config, backend, stage, objective, model, data, output, max_steps, max_length, seed,
                       save_every, overrides)
    if keep_last is not None:
        cfg.keep_last = keep_last
    if skip_nonfinite is not None:
        cfg.skip_nonfinite = skip_nonfinite
    if stop_on_collapse:
        cfg.stop_on_collapse = True
    if dry_run:  # the resolved recipe only: its model and data need not exist yet (a stage-2 recipe's start)
        _print_resolved(cfg)
        return
    _check_flags(cfg, model, data, objective, max_steps)
    if demo and cfg.model == "builtin:demo" and max_steps != 0:
        # No model, data or recipe given: the built-in demo (data -> SFT -> REDI -> held-out evaluation).
        from redi.experiments.demo import run_demo

        run_demo(cfg)
        return
    try:
        summary = run_train(cfg, resume=resume is not None, force=force, dry_run=max_steps == 0)
    except KeyboardInterrupt:
        from redi.training.run_folder import stopped_note

        raise Interrupted(stopped_note(Path(cfg.output))) from None
    if summary.get("dry_run") or summary.get("already_finished"):
        return
    typer.echo(f"done: {summary['steps']} steps in {summary['wall_time_s']:.1f}s; final model in {summary['final_model']}")


def _check_flags(cfg, model, data, objective, max_steps) -> None:
    """Flag combinations that would waste a run: a user model without data, an ignored objective, negative steps."""
    from redi.training.preflight import check_model_has_data

    check_model_has_data(cfg, model, data)
    if objective is not None and cfg.stage == "sft":
        print(f"warning: --objective {objective} is ignored with --stage sft (stage 1 is plain SFT)", file=sys.stderr)
    if max_steps is not None and max_steps < 0:
        raise UserError(f"--max-steps must be 0 (a dry run) or more, got {max_steps}")


def _print_resolved(cfg) -> None:
    """--dry-run: the resolved config, as config.yaml will hold it, after the stage-2 objective line."""
    import yaml

    from redi.backend import default_backend
    from redi.config import objective_line, resolved_dict, validate

    validate(cfg)
    if cfg.stage != "sft":
        typer.echo(f"# {objective_line(cfg)}")
    typer.echo(yaml.safe_dump(resolved_dict(cfg, cfg.backend or default_backend()), sort_keys=False), nl=False)
