"""Checks and accounts before the first optimizer step: what a user should learn in seconds, not hours.

- Both stages' data are loaded and checked before stage 1 trains (a missing pair set used to surface only
  after stage 1).
- One summary line per stage: rows kept, dropped by reason, truncated, suspicious rows, the step plan, and
  warnings when the batch was shrunk to fit the data or every step is a whole epoch.
- Warnings for settings that silently do nothing or mislead (max_length above the model's positions).
- A run folder this call created is removed again when a data or config error stops the run before
  training: a failed start leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Iterator

from redi.builtin import PREFIX
from redi.config import Config
from redi.data import resolve_sources
from redi.errors import UserError
from redi.hub import locate
from redi.layer_checkpointing import micro_batch_tokens_value
from redi.model_dir import check_model_folder


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def no_trace_on_error(run_dir: Path) -> Iterator[None]:
    """Remove ``run_dir`` if it did not exist before and a UserError (or Ctrl-C) ends the block."""
    existed = run_dir.exists()
    try:
        yield
    except (UserError, KeyboardInterrupt):
        if not existed and run_dir.is_dir():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def check_inputs(cfg: Config) -> None:
    """The model and the data must exist before anything is built, imported or written."""
    if not cfg.model.startswith(PREFIX):
        locate(cfg.model, "model", "model path")
        check_model_folder(cfg.model)
    if not cfg.data.startswith(PREFIX):
        for stage in {"sft": ["sft"], "pairs": ["pairs"]}.get(cfg.stage, ["sft", "pairs"]):
            resolve_sources(cfg.data, stage)


def check_model_has_data(cfg: Config, model_flag: str | None, data_flag: str | None) -> None:
    """`--model X` without `--data` used to train on the built-in toy set, which only fits the built-in
    models (a test model built with redi.tiny may still use it through the Python API or a recipe)."""
    check_inputs(cfg)  # a missing model is the first thing to name
    if model_flag is not None and data_flag is None and cfg.data.startswith(PREFIX) and not model_flag.startswith(PREFIX):
        raise UserError(f"--model {model_flag} needs --data (a jsonl/parquet file, a folder or a hub name); "
                        f"the built-in data '{cfg.data}' only fits the built-in models")


def model_warnings(cfg: Config, model_path: str, stages: list[str]) -> None:
    config_path = Path(model_path) / "config.json"
    if not config_path.is_file():
        return
    positions = json.loads(config_path.read_text()).get("max_position_embeddings")
    for stage in stages:
        max_length = getattr(cfg, stage).max_length
        if positions and max_length > positions:
            warn(f"{stage}.max_length {max_length} is above the model's max_position_embeddings {positions}; "
                 f"longer sequences go past the positions it was trained on")


def stage_line(stage: str, report: dict, plan, settings) -> str:
    """One line: rows kept/dropped/truncated and the step plan of a stage."""
    dropped = ", ".join(f"{k} {v:,}" for k, v in sorted(report["dropped"].items())) or "none"
    unit = "sequences" if stage == "sft" else "pairs"
    per_step = min(settings.batch_size, report["kept"])
    rows = f"at most {settings.micro_batch_size:,} {unit}" if settings.micro_batch_size else f"any number of {unit}"
    tokens = micro_batch_tokens_value(settings.micro_batch_tokens)
    budget = "tokens: auto" if tokens is None else f"at most {tokens:,} tokens" if tokens else "no token budget"
    line = (f"{stage}: {report['kept']:,} of {report['rows']:,} rows kept (dropped: {dropped}; truncated "
            f"{report['truncated']:,}); {plan.total_steps:,} step{'s' if plan.total_steps != 1 else ''} of {per_step:,} {unit} "
            f"(micro-batches: {rows}, {budget})")
    return line


def stage_warnings(stage: str, report: dict, settings, shrunk: str | None = None) -> None:
    """``shrunk``: the batch sizes were cut to the data (training.api._shrink_to_data says how)."""
    kept, batch = report["kept"], settings.batch_size
    if shrunk:
        warn(shrunk)
    elif kept < 2 * batch:
        warn(f"{stage}: {kept:,} rows and batch_size {batch:,}: every step is a whole epoch "
             f"({kept - batch:,} rows left out of each epoch)")
    suspicious = report.get("suspicious", {})
    if suspicious.get("chosen_equals_rejected"):
        warn(f"{stage}: {suspicious['chosen_equals_rejected']:,} pairs have chosen == rejected (no signal)")
    if suspicious.get("empty_prompt"):
        warn(f"{stage}: {suspicious['empty_prompt']:,} rows have an empty prompt")


def finish_dry_run(run_dir: Path, existed: bool, stages: list[str], reports: dict) -> dict:
    """--max-steps 0: the checks ran and the plan was printed; remove the folder if this run made it."""
    if not existed:
        shutil.rmtree(run_dir, ignore_errors=True)
    where = "" if existed else "; no run folder written"
    print(f"dry run (--max-steps 0): inputs checked, nothing trained{where}")
    return {"dry_run": True, "stages": stages, "data": reports}
