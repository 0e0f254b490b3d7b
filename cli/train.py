"""`redi train`: flags override the config file, `--set` overrides both."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from redi.config import Config, apply_overrides, load_config
from redi.errors import UserError
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
        if max_steps is not None:
            stage_cfg.max_steps = max_steps
        if max_length is not None:
            stage_cfg.max_length = max_length
    return apply_overrides(cfg, overrides)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        config: Optional[Path] = typer.Option(None, "--config", help="YAML recipe (see configs/)."),
        backend: Optional[str] = typer.Option(None, "--backend", help="cpu | cuda | mlx (default: cuda if available, mlx on Apple silicon, else cpu)."),
        stage: Optional[str] = typer.Option(None, "--stage", help="sft | pairs | both (default both)."),
        objective: Optional[str] = typer.Option(None, "--objective", help=" | ".join(PAIR_OBJECTIVES) + "."),
        model: Optional[str] = typer.Option(None, "--model", help="HF model directory or hub name."),
        data: Optional[str] = typer.Option(None, "--data", help="jsonl/parquet file, save_to_disk folder, hub name, or a `redi data pair` folder."),
        output: Optional[str] = typer.Option(None, "--output", help="Run folder."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps per stage (overrides epochs)."),
        max_length: Optional[int] = typer.Option(None, "--max-length", help="Token limit per sequence, both stages."),
        seed: Optional[int] = typer.Option(None, "--seed"),
        save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N optimizer steps."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its newest checkpoint."),
        force: bool = typer.Option(False, "--force", help="With --resume: accept a config that differs from the run's."),
        keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Keep only the newest K checkpoints."),
        skip_nonfinite: Optional[int] = typer.Option(None, "--skip-nonfinite", help="Tolerate up to N non-finite steps (skipped and logged)."),
        stop_on_collapse: bool = typer.Option(False, "--stop-on-collapse", help="Stop when the collapse alarm fires."),
        overrides: List[str] = typer.Option([], "--set", help="KEY=VALUE for any config key, e.g. pairs.learning_rate=1e-6."),
    ) -> None:
        """Train stage 1 (SFT on correct traces) and/or stage 2 (pairs with REDI, DPO, SimPO...)."""
        from redi.training.api import train as run_train

        if resume is not None:
            if not (resume / "config.yaml").exists():
                raise UserError(f"--resume {resume}: no config.yaml there; not a redi run folder")
            config = config or resume / "config.yaml"
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
        if demo and cfg.model == "builtin:demo":
            # No model, data or recipe given: the built-in demo (data -> SFT -> REDI -> held-out evaluation).
            from redi.experiments.demo import run_demo

            run_demo(cfg)
            return
        summary = run_train(cfg, resume=resume is not None, force=force)
        typer.echo(f"done: {summary['steps']} steps in {summary['wall_time_s']:.1f}s; final model in {summary['final_model']}")
