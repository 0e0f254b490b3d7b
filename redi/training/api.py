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
from pathlib import Path

from redi.training import checkpoint as ckpt
from redi.backend import Backend, make_backend, model_edits
from redi.builtin import materialise_data, materialise_model
from redi.config import Config, dump, objective_line, validate
from redi.data import Encoder, load_pairs, load_sft, resolve_sources
from redi.errors import UserError
from redi.hub import locate
from redi.lora import spec_from_config
from redi.training.guards import CollapseDetector, NonFiniteBudget
from redi.training.loop import Guards, StageRun, make_progress, reference_logps, run_stage
from redi.training.metrics import MetricsWriter, read_metrics, truncate_metrics
from redi.objectives import make_objective
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
    _shrink_to_data(settings, len(examples))
    run = StageRun(stage, settings, examples, objective, cfg.seed)
    run.report = report.to_dict()  # type: ignore[attr-defined]
    return run


def _shrink_to_data(settings, n_examples: int) -> None:
    """A batch larger than the data is the data (what the step plan trains anyway); config.yaml records it.
    The micro-batch becomes the largest divisor of it that fits, so the recorded config stays valid."""
    if n_examples >= settings.batch_size:
        return
    settings.batch_size = n_examples
    settings.micro_batch_size = max(d for d in range(1, min(settings.micro_batch_size, n_examples) + 1)
                                    if n_examples % d == 0)


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


def train(cfg: Config, *, resume: bool = False, force: bool = False, backend: Backend | None = None) -> dict:
    """Run the configured stages and return the summary (also written to summary.json)."""
    validate(cfg)
    run_dir = Path(cfg.output)
    # Multi-process (torchrun): every rank trains; only rank 0 writes files (see _on_main and _save).
    main = _rank(backend) == 0 if backend is not None else os.environ.get("RANK", "0") == "0"
    if main:
        check_writable(run_dir)
    stages = _stages(cfg)
    metrics_path = run_dir / "metrics.jsonl"
    state: dict = {}
    if resume:
        drift = config_drift(run_dir, cfg)
        if drift and not force:
            raise UserError(f"--resume {run_dir}: the config differs from the run's in: {', '.join(drift)} (--force to resume anyway)")
        state = resume_point(run_dir, len(stages) == 2)
    elif metrics_path.exists() and read_metrics(metrics_path):
        raise UserError(f"output folder {run_dir} already holds a run; use --resume {run_dir} or another --output")
    backend = backend or make_backend(cfg.backend, cfg.seed, lora=spec_from_config(cfg))
    if hasattr(backend, "configure"):  # the torch backend's speed/memory keys (docs/cuda.md)
        backend.configure(packing=cfg.packing, activation_checkpointing=cfg.activation_checkpointing,
                          compile=cfg.compile, optim_state_dtype=cfg.optim_state_dtype)
    model_path, data = _on_main(backend, lambda: (materialise_model(cfg.model, run_dir, cfg.seed, cfg.task),
                                                  materialise_data(cfg.data, run_dir, cfg.seed, cfg.task)))
    encoder = Encoder(load_tokenizer(model_path), cfg.system_prompt, model_path)
    if main:
        if "pairs" in stages:
            print(objective_line(cfg), flush=True)
        dump(cfg, run_dir / "config.yaml", backend.name)
        if state:
            truncate_metrics(metrics_path, state["global_step"])
        elif metrics_path.exists():
            metrics_path.unlink()
    _on_main(backend, lambda: None)  # a barrier: the other ranks read metrics.jsonl after rank 0 rewrote it
    previous = read_metrics(metrics_path)
    writer = MetricsWriter(metrics_path) if main else _NoWriter()
    started = time.time()
    global_step, reports = 0, {}

    def save_checkpoint(folder: Path, st: dict) -> None:
        def write(tmp: Path | None) -> None:
            if not getattr(backend, "lora", None):  # a LoRA checkpoint is its adapter + optimizer (save_state)
                backend.save_model(str(tmp) if tmp else None)  # collective under multi-process; rank 0 writes
            backend.save_state(str(tmp) if tmp else None)
            if tmp:
                ckpt.write_state(tmp, st)

        _save(backend, folder, write)

    try:
        with make_progress() if main else contextlib.nullcontext(None) as progress:
            for index, stage in enumerate(stages):
                if stage == "sft" and state.get("complete") or stage == "sft" and state.get("stage") == "pairs":
                    global_step = state["global_step"] if state.get("complete") else global_step
                    continue  # stage 1 finished before the interruption; stage 2 starts from sft_final/
                run = _prepare_stage(cfg, stage, model_path, data, encoder)
                reports[stage] = run.report  # type: ignore[attr-defined]
                if main:
                    (run_dir / "data_report.json").write_text(json.dumps(reports, indent=2))
                    dump(cfg, run_dir / "config.yaml", backend.name)  # batch sizes after any shrink to the data
                two_stage_second = stage == "pairs" and len(stages) == 2
                backend.load(str(run_dir / "sft_final") if two_stage_second else model_path,
                             precision=cfg.precision, lm_head_chunk=cfg.lm_head_chunk, **model_edits(cfg))
                if index == 0 or two_stage_second:
                    check_disk_room(run_dir, backend.num_parameters(), cfg.keep_last, cfg.save_every > 0,
                                    trainable=_trainable_parameters(backend))
                backend.start_stage(weight_decay=run.settings.weight_decay)
                start_step = 0
                if state.get("stage") == stage and not state.get("complete"):
                    backend.load_state(state["checkpoint"])
                    start_step, global_step = state["stage_step"], state["global_step"]
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


def _trainable_parameters(backend: Backend) -> int:
    """Adapters only under LoRA; every weight otherwise."""
    count = getattr(backend, "num_trainable_parameters", None)
    return count() if count is not None else backend.num_parameters()


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
