"""The run folder's bookkeeping: writability, disk room, where a resumed run picks up, config drift."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from redi.training import checkpoint as ckpt
from redi.training.metrics import read_metrics
from redi.config import Config, apply_mapping, resolved_dict, validate
from redi.errors import UserError

# Keys that may differ on --resume without changing what is computed.
RESUME_FREE_KEYS = {"output", "backend", "save_every", "keep_last", "log_every", "stop_on_collapse", "skip_nonfinite",
                    "report_to", "wandb_project", "wandb_run_name",
                    # the collapse alarm only flags steps (it stops a run only with stop_on_collapse)
                    "collapse_window", "collapse_drop", "collapse_ratio", "collapse_growth", "collapse_severe_drop"}

# Every named kill point of a training run (redi.atomic.kill_point), one per write that a kill could cut:
# config.yaml, metrics.jsonl (each appended step, and the rewind on resume), data_report.json, a checkpoint
# folder (trainer_state.json inside), sft_final/ (redi_stage.json inside), final/, summary.json.
# tests/test_resume_kill.py kills a run at each one, resumes it, and compares with an uninterrupted run.
WRITE_POINTS = ("config", "metrics-append", "metrics-rewind", "data-report", "checkpoint", "sft-final", "final",
                "summary")


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output folder {run_dir} is not writable: {err.strerror}") from None


def check_disk_room(run_dir: Path, n_parameters: int, keep_last: int, with_checkpoints: bool,
                    trainable: int | None = None) -> None:
    """fp32 weights, plus AdamW's two moments in a checkpoint; refuse before training, not at step 1,000.
    With LoRA (``trainable`` < ``n_parameters``) a checkpoint is the adapter and its moments, and final/ also
    keeps the adapter (twice: PEFT's and mlx-lm's layout) beside the merged weights."""
    model_bytes = 4 * n_parameters
    trainable = n_parameters if trainable is None else trainable
    lora = trainable < n_parameters
    per_checkpoint = 4 * trainable * (2 + 2) if lora else 3 * model_bytes  # adapter in both layouts + m, v
    model_bytes += 2 * 4 * trainable if lora else 0
    need = model_bytes * 2 + (per_checkpoint * (keep_last + 1) if with_checkpoints else 0)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise UserError(f"not enough disk space in {run_dir}: {free / 1e9:.2f} GB free, about {need / 1e9:.2f} GB "
                        f"needed for checkpoints and the final model; free space or lower --keep-last")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "task":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_config(run_dir: Path) -> Path:
    """RUN/config.yaml for ``--resume``: present, and a mapping of keys. An empty file would read as "all
    defaults" and train on them (a file cut by a kill mid-write, before writes were atomic)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: no config.yaml there; not a redi run folder")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict) or not data:
        what = "empty" if not path.read_text().strip() else "not a mapping of keys"
        raise UserError(f"--resume {run_dir}: {path} is {what}; restore it, or pass the run's recipe with "
                        f"--config RECIPE --resume {run_dir} (checked against the config the run was trained with)")
    return path


def finished_summary(run_dir: Path) -> dict | None:
    """summary.json of a run that finished (it and final/ are written last), else None."""
    summary = run_dir / "summary.json"
    if not (summary.is_file() and (run_dir / "final").is_dir()):
        return None
    try:  # unreadable only if written before summary.json was atomic: then the run resumes and rewrites it
        data = json.loads(summary.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def sealed_config(run_dir: Path, two_stages: bool, summary: dict | None) -> dict | None:
    """The resolved config the run's newest state was trained with, as sealed beside that state: summary.json
    for a finished run, else the resume point's trainer_state.json or sft_final/redi_stage.json. None when
    there is no state (a resume starts over) or it predates the seal."""
    if summary is not None:
        return summary.get("config")
    return resume_point(run_dir, two_stages).get("config")


def config_drift(run_dir: Path, cfg: Config, summary: dict | None = None) -> list[str]:
    """Keys (dotted) whose value differs from the sealed config; a hand edit of config.yaml counts. A run folder
    from before the seal compares with its config.yaml."""
    sealed = sealed_config(run_dir, cfg.stage == "both", summary)
    path = run_dir / "config.yaml"
    if sealed is None and not path.exists():
        return []
    raw = sealed if sealed is not None else yaml.safe_load(path.read_text())
    raw = raw if isinstance(raw, dict) else {}
    try:  # resolved again by this version: keys it added (at their defaults), or a folder written before
        saved = flatten(_plain(resolved_dict(validate(apply_mapping(Config(), raw, str(path))))))  # resolution
    except UserError:  # keys this version does not know: compare the record as written
        saved = flatten(_plain(raw))
    now = flatten(_plain(resolved_dict(cfg)))
    return sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE_KEYS and saved.get(k) != now.get(k))


def _plain(data: dict) -> dict:
    """As JSON holds it (tuples become lists), so a sealed record and a live config compare equal."""
    return json.loads(json.dumps(data))


def resume_point(run_dir: Path, two_stages: bool) -> dict:
    """The newest complete state: an intact checkpoint, or the end of stage 1 when sft_final/ is newer."""
    last, _ = ckpt.latest_intact(run_dir)
    state = ckpt.read_state(last) if last else {}
    if state:
        state["checkpoint"] = str(last)
    marker = run_dir / "sft_final" / "redi_stage.json"
    if two_stages and marker.exists():
        sft = json.loads(marker.read_text())
        if state.get("stage") != "pairs" or state.get("global_step", 0) < sft["global_step"]:
            state = {"stage": "sft", "complete": True, "global_step": sft["global_step"], "config": sft.get("config")}
    return state


def stopped_note(run_dir: Path) -> str:
    """Where an interrupted run stopped and what `--resume` will pick up, in one line."""
    if not run_dir.is_dir():
        return f"stopped before training started; nothing was written to {run_dir}"
    records = read_metrics(run_dir / "metrics.jsonl")
    last = records[-1] if records else None
    where = f"after {last['stage']} step {last['step']} (global step {last['global_step']})" if last else "before the first step"
    point = resume_point(run_dir, (run_dir / "sft_final").exists())
    if point.get("checkpoint"):
        start = f"continues from checkpoint {point['checkpoint']}"
    elif point.get("complete"):
        start = f"continues from {run_dir / 'sft_final'} (stage 1 finished)"
    else:
        start = "starts over (no checkpoint written yet; --save-every N writes them)"
    return f"run stopped {where}; `redi train --resume {run_dir}` {start}"
