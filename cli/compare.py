"""`redi compare`: stage-2 objectives side by side from one SFT checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare(
        config: Optional[Path] = typer.Option(None, "--config", help="Compare grid: a YAML file or a shipped name (paper/compare; default: compare, the demo grid)."),
        output: Path = typer.Option(Path("runs/compare"), "--output", help="Folder for compare.md/.csv and plots."),
        backend: Optional[str] = typer.Option(None, "--backend", help="cpu | cuda | mlx."),
        seeds: Optional[int] = typer.Option(None, "--seeds", help="Repeat each arm with N seeds (mean ± std)."),
        overrides: List[str] = typer.Option([], "--set", help="KEY=VALUE: a grid key (eval.benchmarks=[b.jsonl], "
                                            "sft_checkpoints.sft-3ep.path=DIR, eval_every=100) or any recipe key "
                                            "(pairs.max_steps=400)."),
    ) -> None:
        """Run each arm of the grid (REDI, symmetric, DPO, SimPO, continued SFT) and tabulate and plot them."""
        from redi.experiments.compare_report import run_compare
        from redi.errors import UserError
        from redi.recipes import resolve_recipe

        config = resolve_recipe(config or "compare", what="compare config")
        if seeds is not None and seeds < 1:
            raise UserError("--seeds must be at least 1")
        run_compare(config, output, backend or "", seeds, sets=overrides)
