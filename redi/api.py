"""The Python API behind ``redi train``: resolve inputs, run stage 1 and/or stage 2, write the run folder.

Run folder: config.yaml, metrics.jsonl, data_report.json, checkpoints/step-N/, sft_final/ (stage 1's model
when both stages run), final/, summary.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from redi import checkpoint as ckpt
from redi.backend import Backend, make_backend
from redi.builtin import materialise_data, materialise_model
from redi.config import Config, dump, validate
from redi.data import Encoder, load_pairs, load_sft, resolve_sources
from redi.errors import UserError
from redi.loop import StageRun, make_progress, reference_logps, run_stage
from redi.metrics import MetricsWriter, read_metrics, truncate_metrics
from redi.objectives import make_objective


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not Path(model_path).exists() and (model_path.startswith((".", "/")) or model_path.count("/") != 1):
        raise UserError(f"model path not found: {model_path}")
    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {model_path}: {str(err).splitlines()[0]}") from None


def _stages(cfg: Config) -> list[str]:
    return {"sft": ["sft"], "pairs": ["pairs"], "both": ["sft", "pairs"]}[cfg.stage]


def _check_output(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output folder {run_dir} is not writable: {err.strerror}") from None


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


def train(cfg: Config, *, resume: bool = False, backend: Backend | None = None) -> dict:
    """Run the configured stages and return the summary (also written to summary.json)."""
    validate(cfg)
    run_dir = Path(cfg.output)
    _check_output(run_dir)
    state: dict = {}
    if resume:
        last = ckpt.latest_checkpoint(run_dir)
        state = ckpt.read_state(last) if last else {}
    elif (run_dir / "metrics.jsonl").exists() and read_metrics(run_dir / "metrics.jsonl"):
        raise UserError(f"output folder {run_dir} already holds a run; use --resume {run_dir} or another --output")
    model_path = materialise_model(cfg.model, run_dir, cfg.seed, cfg.task)
    data = materialise_data(cfg.data, run_dir, cfg.seed, cfg.task)
    tokenizer = load_tokenizer(model_path)
    encoder = Encoder(tokenizer, cfg.system_prompt, model_path)
    backend = backend or make_backend(cfg.backend, cfg.seed)
    dump(cfg, run_dir / "config.yaml")
    metrics_path = run_dir / "metrics.jsonl"
    if state:
        truncate_metrics(metrics_path, state["global_step"])
    elif metrics_path.exists():
        metrics_path.unlink()
    writer = MetricsWriter(metrics_path)
    started = time.time()
    global_step, reports, stage_models = 0, {}, {}
    stages = _stages(cfg)
    try:
        with make_progress() as progress:
            for index, stage in enumerate(stages):
                sft_done = stage == "sft" and len(stages) == 2 and (run_dir / "sft_final" / "config.json").exists()
                if sft_done and (resume or state.get("stage") == "pairs"):
                    global_step = json.loads((run_dir / "sft_final" / "redi_stage.json").read_text())["global_step"]
                    continue
                run = _prepare_stage(cfg, stage, model_path, data, encoder)
                reports[stage] = run.report  # type: ignore[attr-defined]
                (run_dir / "data_report.json").write_text(json.dumps(reports, indent=2))
                start_from = model_path
                if stage == "pairs" and len(stages) == 2:
                    start_from = str(run_dir / "sft_final")
                if index == 0 or stage == "pairs" and len(stages) == 2:
                    backend.load(start_from, precision=cfg.precision, lm_head_chunk=cfg.lm_head_chunk)
                backend.start_stage(weight_decay=run.settings.weight_decay)
                start_step = 0
                if state.get("stage") == stage:
                    backend.load_state(str(ckpt.latest_checkpoint(run_dir)))
                    start_step, global_step = state["stage_step"], state["global_step"]
                if run.objective is not None and run.objective.needs_reference:
                    run.reference = reference_logps(backend, run.examples, run.settings.micro_batch_size,
                                                    run_dir / "reference_logps.npy", progress)

                def save_checkpoint(folder: Path, st: dict) -> None:
                    def write(tmp: Path) -> None:
                        backend.save_model(str(tmp))
                        backend.save_state(str(tmp))
                        ckpt.write_state(tmp, st)

                    ckpt.atomic_dir(folder, write)

                global_step = run_stage(run, backend, run_dir, writer, global_step=global_step, start_step=start_step,
                                        save_every=cfg.save_every, keep_last=cfg.keep_last, progress=progress,
                                        on_checkpoint=save_checkpoint)
                stage_models[stage] = global_step
                if stage == "sft" and len(stages) == 2:
                    def write_sft(tmp: Path) -> None:
                        backend.save_model(str(tmp))
                        (tmp / "redi_stage.json").write_text(json.dumps({"global_step": global_step}))

                    ckpt.atomic_dir(run_dir / "sft_final", write_sft)
        ckpt.atomic_dir(run_dir / "final", lambda tmp: backend.save_model(str(tmp)))
    finally:
        writer.close()
    records = read_metrics(metrics_path)
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
        "last": {st: next((r for r in reversed(records) if r["stage"] == st), None) for st in stages},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

