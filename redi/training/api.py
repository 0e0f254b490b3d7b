"""The Python API behind ``redi train``: resolve inputs, run stage 1 and/or stage 2, write the run folder.

Run folder: config.yaml, metrics.jsonl, data_report.json, checkpoints/step-N/, sft_final/ (stage 1's model
when both stages run), final/, summary.json.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

from redi.training import checkpoint as ckpt
from redi.backend import Backend, make_backend
from redi.builtin import materialise_data, materialise_model
from redi.config import Config, dump, validate
from redi.data import Encoder, load_pairs, load_sft, resolve_sources
from redi.errors import UserError
from redi.hub import locate
from redi.training.guards import CollapseDetector, NonFiniteBudget
from redi.training.loop import Guards, StageRun, make_progress, reference_logps, run_stage
from redi.training.metrics import MetricsWriter, read_metrics, truncate_metrics
from redi.objectives import make_objective
from redi.training.preflight import check_inputs, model_warnings, no_trace_on_error, stage_line, stage_warnings
from redi.training.run_folder import check_disk_room, check_writable, config_drift, resume_point


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    locate(model_path, "model", "model path")
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {model_path}: {str(err).splitlines()[0]}") from None


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
    run = StageRun(stage, settings, examples, objective, cfg.seed)
    run.report = report.to_dict()  # type: ignore[attr-defined]
    return run


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


def train(cfg: Config, *, resume: bool = False, force: bool = False, backend: Backend | None = None,
          dry_run: bool = False) -> dict:
    """Run the configured stages and return the summary (also written to summary.json). ``dry_run``: resolve,
    load and check both data sets, print the plan, train nothing and leave no run folder behind."""
    validate(cfg)
    check_inputs(cfg)
    run_dir = Path(cfg.output)
    drift = config_drift(run_dir, cfg) if resume else []
    if drift and not force:
        raise UserError(f"--resume {run_dir}: the config differs from the run's in: {', '.join(drift)} (--force to resume anyway)")
    if resume and (run_dir / "summary.json").exists() and (run_dir / "final").is_dir():
        summary = json.loads((run_dir / "summary.json").read_text())
        print(f"{run_dir} already finished ({summary['steps']} steps); nothing to do")
        return {**summary, "already_finished": True}
    with no_trace_on_error(run_dir):
        prepared = _prepare(cfg, run_dir, resume, force, backend, dry_run)
    if dry_run:
        return prepared
    return _train_prepared(cfg, run_dir, **prepared)


def _prepare(cfg: Config, run_dir: Path, resume: bool, force: bool, backend: Backend | None, dry_run: bool) -> dict:
    """Everything before the first step; a UserError here leaves no run folder this call created."""
    existed = run_dir.exists()
    # Multi-process (torchrun): every rank trains; only rank 0 writes files (see _on_main and _save).
    main = _rank(backend) == 0 if backend is not None else os.environ.get("RANK", "0") == "0"
    if main:
        check_writable(run_dir)
    stages = _stages(cfg)
    metrics_path = run_dir / "metrics.jsonl"
    state: dict = {}
    if resume:
        state = resume_point(run_dir, len(stages) == 2)
    elif metrics_path.exists() and read_metrics(metrics_path):
        raise UserError(f"output folder {run_dir} already holds a run; use --resume {run_dir} or another --output")
    backend = backend or make_backend(cfg.backend, cfg.seed, lora_rank=cfg.lora_rank, lora_scale=cfg.lora_scale,
                                      lora_dora=cfg.lora_dora)
    if hasattr(backend, "configure"):  # the torch backend's speed/memory keys (docs/cuda.md)
        backend.configure(packing=cfg.packing, activation_checkpointing=cfg.activation_checkpointing,
                          compile=cfg.compile, optim_state_dtype=cfg.optim_state_dtype)
    model_path, data = _on_main(backend, lambda: (materialise_model(cfg.model, run_dir, cfg.seed, cfg.task),
                                                  materialise_data(cfg.data, run_dir, cfg.seed, cfg.task)))
    encoder = Encoder(load_tokenizer(model_path), cfg.system_prompt, model_path)
    runs = {stage: _prepare_stage(cfg, stage, model_path, data, encoder) for stage in stages
            if not _stage_done(stage, state)}  # both data sets are checked before any step
    if main:
        model_warnings(cfg, model_path, list(runs))
        for stage, run in runs.items():
            print(stage_line(stage, run.report, run.plan(), run.settings))  # type: ignore[attr-defined]
            stage_warnings(stage, run.report, run.settings)  # type: ignore[attr-defined]
    if dry_run:
        print(f"dry run (--max-steps 0): inputs checked, nothing trained{'' if existed else '; no run folder written'}")
        if not existed:
            shutil.rmtree(run_dir, ignore_errors=True)
        return {"dry_run": True, "stages": stages, "data": {s: r.report for s, r in runs.items()}}  # type: ignore[attr-defined]
    if main:
        dump(cfg, run_dir / "config.yaml")
        if state:
            truncate_metrics(metrics_path, state["global_step"])
        elif metrics_path.exists():
            metrics_path.unlink()
    _on_main(backend, lambda: None)  # a barrier: the other ranks read metrics.jsonl after rank 0 rewrote it
    previous = read_metrics(metrics_path)
    return {"backend": backend, "stages": stages, "state": state, "runs": runs, "previous": previous,
            "main": main, "model_path": model_path}


def _stage_done(stage: str, state: dict) -> bool:
    """Stage 1 finished before a resumed run's interruption (stage 2 then starts from sft_final/)."""
    return stage == "sft" and (bool(state.get("complete")) or state.get("stage") == "pairs")


def _train_prepared(cfg: Config, run_dir: Path, *, backend: Backend, stages: list[str], state: dict, runs: dict,
                    previous: list[dict], main: bool, model_path: str) -> dict:
    metrics_path = run_dir / "metrics.jsonl"
    writer = MetricsWriter(metrics_path) if main else _NoWriter()
    started = time.time()
    global_step, reports = 0, {}

    def save_checkpoint(folder: Path, st: dict) -> None:
        def write(tmp: Path | None) -> None:
            backend.save_model(str(tmp) if tmp else None)  # collective under multi-process; rank 0 writes
            backend.save_state(str(tmp) if tmp else None)
            if tmp:
                ckpt.write_state(tmp, st)

        _save(backend, folder, write)

    try:
        with make_progress(cfg.log_every) if main else contextlib.nullcontext(None) as progress:
            for index, stage in enumerate(stages):
                if _stage_done(stage, state):
                    global_step = state["global_step"] if state.get("complete") else global_step
                    if main:
                        print(f"resumed after stage sft ({run_dir / 'sft_final'}, global step {state['global_step']})")
                    continue  # stage 1 finished before the interruption; stage 2 starts from sft_final/
                run = runs[stage]
                reports[stage] = run.report  # type: ignore[attr-defined]
                if main:
                    (run_dir / "data_report.json").write_text(json.dumps(reports, indent=2))
                two_stage_second = stage == "pairs" and len(stages) == 2
                backend.load(str(run_dir / "sft_final") if two_stage_second else model_path,
                             precision=cfg.precision, lm_head_chunk=cfg.lm_head_chunk)
                if index == 0 or two_stage_second:
                    check_disk_room(run_dir, backend.num_parameters(), cfg.keep_last, cfg.save_every > 0)
                backend.start_stage(weight_decay=run.settings.weight_decay)
                start_step = 0
                if state.get("stage") == stage and not state.get("complete"):
                    backend.load_state(state["checkpoint"])
                    start_step, global_step = state["stage_step"], state["global_step"]
                    if main:
                        print(f"resumed from {stage} step {start_step} of {run.plan().total_steps} "
                              f"(checkpoint {state['checkpoint']})")
                if run.objective is not None and run.objective.needs_reference:
                    # Computed from the stage's start model, so a resumed run must reuse the cached file.
                    run.reference = reference_logps(backend, run.examples, run.settings.micro_batch_size,
                                                    run_dir / "reference_logps.npy", progress)
                global_step = run_stage(run, backend, run_dir, writer, global_step=global_step, start_step=start_step,
                                        save_every=cfg.save_every, keep_last=cfg.keep_last, progress=progress,
                                        on_checkpoint=save_checkpoint, guards=_guards(cfg, stage, run, previous))
                if stage == "sft" and len(stages) == 2:
                    def write_sft(tmp: Path | None, step: int = global_step) -> None:
                        backend.save_model(str(tmp) if tmp else None)
                        if tmp:
                            (tmp / "redi_stage.json").write_text(json.dumps({"global_step": step}))

                    _save(backend, run_dir / "sft_final", write_sft)
        _save(backend, run_dir / "final", lambda tmp: backend.save_model(str(tmp) if tmp else None))
    finally:
        writer.close()
    records = read_metrics(metrics_path)
    if not reports and (run_dir / "data_report.json").exists():
        reports = json.loads((run_dir / "data_report.json").read_text())
    summary = {
        "stages": stages,
        "backend": backend.name,
        "model": cfg.model,
        "objective": cfg.objective if "pairs" in stages else None,
        "steps": global_step,
        "parameters": backend.num_parameters(),
        "wall_time_s": round(time.time() - started, 3),
        "final_model": str(run_dir / "final"),
        "data": reports,
        "nonfinite_steps_skipped": [r["global_step"] for r in records if r.get("nonfinite_skipped")],
        "collapse_warnings": [r["global_step"] for r in records if r.get("collapse_warning")],
        "last": {st: next((r for r in reversed(records) if r["stage"] == st), None) for st in stages},
    }
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _rank(backend: Backend) -> int:
    return getattr(backend, "rank", 0)


def _on_main(backend: Backend, fn):
    """Run ``fn`` on rank 0 only and hand its result to every rank (one process: just ``fn()``)."""
    if getattr(backend, "world_size", 1) == 1:
        return fn()
    return backend.all_gather_object(fn() if _rank(backend) == 0 else None)[0]  # type: ignore[attr-defined]


def _save(backend: Backend, folder: Path, write) -> None:
    """An atomic model folder written by rank 0; the other ranks take part in gathering the weights and
    wait until the folder is in place (stage 2 loads sft_final/ right after)."""
    if _rank(backend) == 0:
        ckpt.atomic_dir(folder, write)
    else:
        write(None)
    _on_main(backend, lambda: None)


class _NoWriter:
    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
