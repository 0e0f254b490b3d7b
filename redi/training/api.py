"""The Python API behind ``redi train``: resolve inputs, run stage 1 and/or stage 2, write the run folder.

Run folder: config.yaml, metrics.jsonl, data_report.json, checkpoints/step-N/, sft_final/ (stage 1's model
when both stages run), final/, summary.json.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from redi.atomic import recover_jsonl, remove_stale, write_text_atomic
from redi.backend import Backend, backend_options, make_backend, model_edits
from redi.builtin import materialise_data, materialise_model
from redi.config import Config, dump, objective_line, resolved_dict, to_dict, validate
from redi.data import Encoder, load_pairs, load_sft, resolve_sources
from redi.errors import UserError
from redi.hub import locate
from redi.model_dir import tokenizer_error
from redi.training.guards import CollapseDetector, NonFiniteBudget
from redi.objectives import make_objective
from redi.training import checkpoint as ckpt
from redi.layer_checkpointing import micro_batch_tokens_value
from redi.training.loop import Guards, StageRun, make_progress, reference_logps, resolve_token_budget, run_stage
from redi.training.metrics import MetricsWriter, read_metrics, truncate_metrics
from redi.training.preflight import (check_inputs, finish_dry_run, model_warnings, no_trace_on_error, stage_line,
                                     stage_warnings, warn)
from redi.training.ranks import NoWriter, on_main, save_on_main
from redi.training.report_to import MetricsSink, open_sinks
from redi.training.run_folder import (check_disk_room, check_writable, config_drift, finished_summary,
                                      resume_point)


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    locate(model_path, "model", "model path")
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise UserError(tokenizer_error(model_path, err)) from None


def _stages(cfg: Config) -> list[str]:
    return {"sft": ["sft"], "pairs": ["pairs"], "both": ["sft", "pairs"]}[cfg.stage]


def _prepare_stage(cfg: Config, stage: str, model_path: str, data: str, encoder: Encoder) -> StageRun:
    settings = cfg.sft if stage == "sft" else cfg.pairs
    source = resolve_sources(data, stage)
    if stage == "sft":
        examples, report = load_sft(source, encoder, settings.max_length, cfg.on_malformed)
        objective = None
    else:
        examples, report = load_pairs(source, encoder, settings.max_length, settings.max_prompt_length, cfg.on_malformed)
        objective = make_objective(cfg.objective, **cfg.objective_params())
    if not examples:
        raise UserError(f"no usable {stage} rows in {source} ({report.rows} read, dropped: {report.dropped or 'none'})")
    shrunk = _shrink_to_data(stage, settings, len(examples))
    run = StageRun(stage, settings, examples, objective, cfg.seed)
    run.report = report.to_dict()  # type: ignore[attr-defined]
    run.shrunk = shrunk  # type: ignore[attr-defined]
    return run


def _shrink_to_data(stage: str, settings, n_examples: int) -> str | None:
    """A batch larger than the data is the data (what the step plan trains anyway); config.yaml records it.
    A row cap above the new batch comes down with it. Returns the warning that says so (None when nothing
    changed)."""
    if n_examples >= settings.batch_size:
        return None
    batch, micro = settings.batch_size, settings.micro_batch_size
    settings.batch_size = n_examples
    settings.micro_batch_size = min(micro, n_examples)  # a cap on rows per micro-batch (0: none)
    change = f"batch_size {batch} -> {n_examples}"
    if settings.micro_batch_size != micro:
        change += f", micro_batch_size {micro} -> {settings.micro_batch_size}"
    return f"{stage}: only {n_examples:,} rows for batch_size {batch:,}: {change}; every step is a whole epoch"


def _guards(cfg: Config, stage: str, run: StageRun, previous: list[dict]) -> Guards:
    collapse = None
    if stage == "pairs":
        warmup = math.ceil(run.settings.warmup_ratio * run.plan().total_steps)
        collapse = CollapseDetector.from_config(cfg, ignore_before=warmup)
        for record in previous:  # a resumed run re-reads its window from metrics.jsonl
            if record.get("stage") == stage:
                collapse.update(record)
    budget = NonFiniteBudget(cfg.skip_nonfinite, [r["global_step"] for r in previous if r.get("nonfinite_skipped")])
    return Guards(collapse, cfg.stop_on_collapse, budget)


@dataclass
class _Session:
    """One ``train`` call's inputs, resolved once, and its running totals."""

    cfg: Config
    run_dir: Path
    stages: list[str]
    state: dict  # where a resumed run picks up (run_folder.resume_point); empty for a fresh run
    backend: Backend
    model_path: str
    data: str
    encoder: Encoder
    runs: dict[str, StageRun]  # each stage's checked, tokenized data (a stage finished before a resume has none)
    previous: list[dict] = field(default_factory=list)  # metrics.jsonl records kept from before a resume
    writer: MetricsSink = field(default_factory=NoWriter)
    global_step: int = 0
    reports: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.backend.rank == 0


def train(cfg: Config, *, resume: bool = False, force: bool = False, backend: Backend | None = None,
          dry_run: bool = False) -> dict:
    """Run the configured stages and return the summary (also written to summary.json). A ``backend`` passed in
    keeps the options it was built with; otherwise ``make_backend`` builds one with the config's options.
    ``dry_run``: resolve, load and check both data sets, print the plan, train nothing, leave no run folder."""
    validate(cfg)
    check_inputs(cfg)
    run_dir = Path(cfg.output)
    if resume:
        finished = _resume_check(cfg, run_dir, force)
        if finished:
            return finished
    existed = run_dir.exists()
    with no_trace_on_error(run_dir):  # a data or config error before training leaves no half-made folder
        session = _prepare(cfg, resume, backend)
    if dry_run:
        return finish_dry_run(run_dir, existed, session.stages, {s: r.report for s, r in session.runs.items()})  # type: ignore[attr-defined]
    _open_run(session)
    started = time.time()
    try:
        with make_progress(cfg.log_every) if session.main else contextlib.nullcontext(None) as progress:
            for index, stage in enumerate(session.stages):
                _train_stage(session, index, stage, progress)
        save_on_main(session.backend, session.run_dir / "final", session.backend.save_model, point="final")
    finally:
        session.writer.close()
    return _summarise(session, time.time() - started)


def _resume_check(cfg: Config, run_dir: Path, force: bool) -> dict | None:
    """Refuse a config that differs from the one the run was trained with (a flag, --set or a hand edit of
    config.yaml; ``force`` accepts it), and any change to a finished run, which is never extended: every
    step's learning rate depends on the step count, so steps already taken would not match a longer run.
    A finished run's summary when there is nothing to do."""
    read_metrics(run_dir / "metrics.jsonl")  # a damaged line is named before any data is loaded
    summary = finished_summary(run_dir)
    drift = config_drift(run_dir, cfg, summary)
    if drift and summary is not None:
        raise UserError(f"--resume {run_dir}: the run already finished ({summary['steps']} steps) and is not retrained "
                        f"or extended, so the changed {', '.join(drift)} cannot apply (the learning-rate schedule of "
                        f"every step depends on the step count); start a new run: redi train --config "
                        f"{run_dir / 'config.yaml'} --output NEW_RUN with the changes")
    if drift and not force:
        raise UserError(f"--resume {run_dir}: the config differs from the run's in: {', '.join(drift)} (--force to resume anyway)")
    if summary is None:
        return None
    print(f"{run_dir} already finished ({summary['steps']} steps); nothing to do")
    return {**summary, "already_finished": True}


def _prepare(cfg: Config, resume: bool, backend: Backend | None) -> _Session:
    """Check the run folder, find the resume point, build the backend, materialise the model, load and check
    every stage's data (before any step), and print one account line per stage."""
    run_dir = Path(cfg.output)
    # Multi-process (torchrun): every rank trains; only rank 0 writes files (see ranks.py).
    main = backend.rank == 0 if backend is not None else os.environ.get("RANK", "0") == "0"
    if main:
        check_writable(run_dir)
        _remove_stale(run_dir)
    stages = _stages(cfg)
    metrics_path = run_dir / "metrics.jsonl"
    state: dict = {}
    if resume:
        state = resume_point(run_dir, len(stages) == 2)
        for note in ckpt.latest_intact(run_dir)[1] if main else []:
            warn(f"checkpoint {note}; resuming from the previous intact state")
    elif metrics_path.exists() and read_metrics(metrics_path):
        raise UserError(f"output folder {run_dir} already holds a run; use --resume {run_dir} or another --output")
    backend = backend or make_backend(cfg.backend, cfg.seed, **backend_options(cfg, cfg.backend))
    model_path, data = on_main(backend, lambda: (materialise_model(cfg.model, run_dir, cfg.seed, cfg.task),
                                                 materialise_data(cfg.data, run_dir, cfg.seed, cfg.task)))
    encoder = Encoder(load_tokenizer(model_path), cfg.system_prompt, model_path)
    runs = {stage: _prepare_stage(cfg, stage, model_path, data, encoder) for stage in stages
            if not _stage_done(stage, state)}
    if main:
        if "pairs" in stages:
            print(objective_line(cfg), flush=True)
        model_warnings(cfg, model_path, list(runs))
        for stage, run in runs.items():
            print(stage_line(stage, run.report, run.plan(), run.settings))  # type: ignore[attr-defined]
            stage_warnings(stage, run.report, run.settings, run.shrunk)  # type: ignore[attr-defined]
    return _Session(cfg, run_dir, stages, state, backend, model_path, data, encoder, runs)


def _remove_stale(run_dir: Path) -> None:
    """What a killed process left of its atomic writes: a checkpoint never renamed (full size), temporaries."""
    stale = remove_stale(run_dir) + remove_stale(run_dir / "checkpoints")
    if stale:
        print(f"removed {len(stale)} unfinished write{'s' if len(stale) > 1 else ''} of a killed run: "
              f"{', '.join(p.name for p in stale)}")


def _stage_done(stage: str, state: dict) -> bool:
    """Stage 1 finished before a resumed run's interruption (stage 2 then starts from sft_final/)."""
    return stage == "sft" and (bool(state.get("complete")) or state.get("stage") == "pairs")


def _open_run(session: _Session) -> None:
    """Write config.yaml, rewind metrics.jsonl to the resume point, open the metrics sinks. A resumed run keeps
    the data reports of the stages it does not redo."""
    cfg, run_dir, state, backend = session.cfg, session.run_dir, session.state, session.backend
    metrics_path = run_dir / "metrics.jsonl"
    if session.main:
        dump(cfg, run_dir / "config.yaml", backend.name)
        recover_jsonl(metrics_path)
        if state:
            truncate_metrics(metrics_path, state["global_step"])
        elif metrics_path.exists():
            metrics_path.unlink()
    if state and (run_dir / "data_report.json").is_file():
        session.reports = json.loads((run_dir / "data_report.json").read_text())
    on_main(backend, lambda: None)  # a barrier: the other ranks read metrics.jsonl after rank 0 rewrote it
    session.previous = read_metrics(metrics_path)
    session.writer = open_sinks(MetricsWriter(metrics_path), run_dir, cfg.report_to, project=cfg.wandb_project,
                                name=cfg.wandb_run_name, config=to_dict(cfg)) if session.main else NoWriter()


def _train_stage(session: _Session, index: int, stage: str, progress) -> None:
    """Load the stage's start model, restore a checkpoint if resuming into this stage, train, save sft_final/."""
    cfg, run_dir, state, backend = session.cfg, session.run_dir, session.state, session.backend
    if _stage_done(stage, state):
        session.global_step = state["global_step"] if state.get("complete") else session.global_step
        if session.main and state.get("complete"):
            print(f"resumed after stage sft ({run_dir / 'sft_final'}, global step {state['global_step']})")
        return  # stage 1 finished before the interruption; stage 2 starts from sft_final/
    run = session.runs[stage]
    session.reports[stage] = run.report  # type: ignore[attr-defined]
    if session.main:
        write_text_atomic(run_dir / "data_report.json", json.dumps(session.reports, indent=2), point="data-report")
    two_stage_second = stage == "pairs" and len(session.stages) == 2
    backend.load(str(run_dir / "sft_final") if two_stage_second else session.model_path,
                 precision=cfg.precision, lm_head_chunk=cfg.lm_head_chunk, **model_edits(cfg))
    if index == 0 or two_stage_second:
        check_disk_room(run_dir, backend.num_parameters(), cfg.keep_last, cfg.save_every > 0,
                        trainable=backend.num_trainable_parameters())
    backend.init_optimizer(weight_decay=run.settings.weight_decay)
    budget = resolve_token_budget(run, backend)
    if session.main and micro_batch_tokens_value(run.settings.micro_batch_tokens) is None:
        print(f"{stage}: micro-batches of up to {budget:,} tokens (micro_batch_tokens auto: what fits in free memory)")
    start_step = 0
    if state.get("stage") == stage and not state.get("complete"):
        backend.load_checkpoint(state["checkpoint"])
        start_step, session.global_step = state["stage_step"], state["global_step"]
        if session.main:
            print(f"resumed from {stage} step {start_step} of {run.plan().total_steps} (checkpoint {state['checkpoint']})")
    if run.objective is not None and run.objective.needs_reference:
        # Computed from the stage's start model, so a resumed run must reuse the cached file.
        run.reference = reference_logps(backend, run.examples, run.plan(),
                                        run_dir / "reference_logps.npy", progress)

    sealed = resolved_dict(cfg, backend.name)  # what --resume compares a later config with

    def save_checkpoint(folder: Path, st: dict) -> None:
        def write(tmp: str | None) -> None:
            backend.save_checkpoint(tmp)  # collective under multi-process; rank 0 writes
            if tmp:
                ckpt.write_state(Path(tmp), {**st, "config": sealed})

        save_on_main(backend, folder, write, point="checkpoint")

    session.global_step = run_stage(run, backend, run_dir, session.writer, global_step=session.global_step,
                                    start_step=start_step, save_every=cfg.save_every, keep_last=cfg.keep_last,
                                    progress=progress, on_checkpoint=save_checkpoint,
                                    guards=_guards(cfg, stage, run, session.previous))
    if stage == "sft" and len(session.stages) == 2:
        def write_sft(tmp: str | None, step: int = session.global_step) -> None:
            backend.save_model(tmp)
            if tmp:
                write_text_atomic(Path(tmp, "redi_stage.json"), json.dumps({"global_step": step, "config": sealed}))

        save_on_main(backend, run_dir / "sft_final", write_sft, point="sft-final")


def _summarise(session: _Session, wall_time_s: float) -> dict:
    """summary.json: what ran, the last metrics of each stage, the skipped and collapse-flagged steps."""
    cfg, run_dir, stages, reports = session.cfg, session.run_dir, session.stages, session.reports
    records = read_metrics(run_dir / "metrics.jsonl")
    if not reports and (run_dir / "data_report.json").exists():
        reports = json.loads((run_dir / "data_report.json").read_text())
    summary = {
        "stages": stages,
        "backend": session.backend.name,
        "model": cfg.model,
        "objective": cfg.objective if "pairs" in stages else None,
        "steps": session.global_step,
        "parameters": session.backend.num_parameters(),
        "wall_time_s": round(wall_time_s, 3),
        "final_model": str(run_dir / "final"),
        "data": reports,
        "nonfinite_steps_skipped": [r["global_step"] for r in records if r.get("nonfinite_skipped")],
        "collapse_warnings": [r["global_step"] for r in records if r.get("collapse_warning")],
        "last": {st: next((r for r in reversed(records) if r["stage"] == st), None) for st in stages},
        "config": resolved_dict(cfg, session.backend.name),  # sealed: --resume compares a later config with it
    }
    if session.main:
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2), point="summary")
    return summary
