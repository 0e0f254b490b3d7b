"""The training loop: one readable function, shared by every backend and both stages."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from rich.progress import Progress

from redi.atomic import temporary_name
from redi.backend import Backend, MicroBatch
from redi.config import StageConfig
from redi.data import TokenizedPair, TokenizedSeq
from redi.errors import UserError
from redi.training.progress import make_progress  # noqa: F401 (the callers' import)
from redi.objectives import Objective, PairStats, sft_loss
from redi.training import checkpoint as ckpt
from redi.layer_checkpointing import micro_batch_tokens_value
from redi.training.batching import StepPlan, example_tokens, lr_at, token_groups
from redi.training.guards import CollapseDetector, NonFiniteBudget
from redi.training.metrics import pair_step_metrics, sft_step_metrics
from redi.training.ranks import rank_share
from redi.training.report_to import MetricsSink


@dataclass
class Guards:
    collapse: CollapseDetector | None = None
    stop_on_collapse: bool = False
    nonfinite: NonFiniteBudget = field(default_factory=NonFiniteBudget)


@dataclass
class StageRun:
    name: str  # "sft" or "pairs"
    settings: StageConfig
    examples: Sequence[TokenizedSeq] | Sequence[TokenizedPair]
    objective: Objective | None  # None for SFT
    seed: int
    reference: np.ndarray | None = None  # [n_examples, 2] reference S (chosen, rejected) for DPO
    micro_batch_tokens: int = 0  # the settings' micro_batch_tokens with auto resolved (resolve_token_budget)
    padded: bool = False  # the backend right-pads micro-batches (resolve_token_budget)

    def plan(self) -> StepPlan:
        s = self.settings
        return StepPlan(len(self.examples), s.batch_size, s.micro_batch_size, s.epochs, s.max_steps, self.seed,
                        self.micro_batch_tokens, self.padded)

    def longest_sequence(self) -> int:
        return max(max(e.chosen.length, e.rejected.length) if isinstance(e, TokenizedPair) else e.length
                   for e in self.examples)


def resolve_token_budget(run: StageRun, backend: Backend) -> int:
    """The stage's micro_batch_tokens as a number: ``auto`` asks the loaded backend what fits in its free memory,
    and every rank takes the smallest answer (all ranks must cut the step into the same micro-batches)."""
    value = micro_batch_tokens_value(run.settings.micro_batch_tokens, f"{run.name}.micro_batch_tokens")
    if value is None:
        value = min(backend.all_gather_object(backend.micro_batch_token_budget(run.longest_sequence())))
    run.micro_batch_tokens, run.padded = value, backend.pads_micro_batches
    return value


def micro_batch_loss(run: StageRun, batch: MicroBatch) -> Callable:
    """The loss the backend differentiates for one micro-batch, weighted by its share of the step."""
    if run.objective is None:
        return lambda ops, logps, lengths: sft_loss(ops, logps, lengths) * batch.weight
    objective, ref = run.objective, batch.ref_logps

    def loss(ops, logps, lengths):
        stats = PairStats.from_halves(logps, lengths, None if ref is None else ops.asarray(ref))
        return objective(ops, stats)[0] * batch.weight

    return loss


def reference_logps(backend: Backend, examples: Sequence[TokenizedPair], plan: StepPlan,
                    cache: Path, progress: Progress | None = None) -> np.ndarray:
    """Reference S for every pair, computed once with the frozen start model and cached in the run folder."""
    if cache.exists():
        ref = np.load(cache)
        if ref.shape == (len(examples), 2):
            return ref
    ref = np.zeros((len(examples), 2))
    task = progress.add_task("reference log-probs", total=len(examples), info="") if progress else None
    sizes = [example_tokens(e, plan.padded) for e in examples]
    for group in token_groups(sizes, plan.micro_batch_tokens, plan.micro_batch_size, plan.padded):
        idx = np.asarray(group)
        batch = MicroBatch([examples[i].chosen for i in idx] + [examples[i].rejected for i in idx], len(idx), 1.0, idx)
        stats = PairStats.from_halves(*backend.sequence_logps(batch))
        ref[idx, 0], ref[idx, 1] = stats.chosen_logps, stats.rejected_logps
        if progress:
            progress.advance(task, len(idx))
    if backend.rank == 0:  # every rank computed the same values; one writes them
        tmp = temporary_name(cache)  # a kill leaves no cut cache; the next start removes the temporary
        with open(tmp, "wb") as fh:
            np.save(fh, ref)
        tmp.rename(cache)
    return ref


def run_stage(run: StageRun, backend: Backend, run_dir: Path, writer: MetricsSink, *, global_step: int,
              start_step: int = 0, save_every: int = 0, keep_last: int = 2,
              progress: Progress | None = None, on_checkpoint: Callable[[Path, dict], None] | None = None,
              guards: Guards | None = None) -> int:
    """Train one stage from ``start_step``; returns the global step count after the stage."""
    plan = run.plan()
    total = plan.total_steps
    guards = guards or Guards()
    task = progress.add_task(f"stage {run.name}", total=total, completed=start_step, info="") if progress else None
    for step in range(start_step, total):
        t0 = time.perf_counter()
        lr = lr_at(step, total, run.settings.learning_rate, run.settings.warmup_ratio)
        results = _accumulate(run, backend, plan.micro_batches(step, run.examples))
        update = backend.optimizer_step(lr, run.settings.max_grad_norm)
        elapsed = time.perf_counter() - t0
        global_step += 1
        record = _step_record(run, results)
        tokens = sum(r.tokens for r in results)
        record.update({
            "grad_norm": update["grad_norm"], "update_norm": update["update_norm"], "lr": lr,
            "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "step": step + 1, "global_step": global_step, "stage": run.name, "epoch": plan.epoch_of(step),
            "time_s": elapsed,
        })
        collapsed = _apply_guards(guards, record, bool(update.get("skipped")))
        if backend.rank == 0:
            writer.write(record)
        _raise_if_stopped(run, guards, record, collapsed, run_dir)
        if progress:
            progress.update(task, advance=1, info=_progress_info(run, record, collapsed))
        if save_every and global_step % save_every == 0 and step + 1 < total and on_checkpoint:
            state = {"stage": run.name, "stage_step": step + 1, "global_step": global_step, "total_steps": total}
            on_checkpoint(run_dir / "checkpoints" / f"step-{global_step}", state)
            if backend.rank == 0:
                ckpt.prune(run_dir, keep_last)
    return global_step


@dataclass
class _Result:
    """What one micro-batch of a step produced, for the step's metrics."""

    index: int  # the micro-batch's place in the step (results are gathered from every rank in this order)
    logps: np.ndarray  # S, chosen then rejected for pairs
    lengths: np.ndarray  # L, as float64
    ref_logps: np.ndarray | None
    tokens: int


def _accumulate(run: StageRun, backend: Backend, batches: list[MicroBatch]) -> list[_Result]:
    """Forward/backward this rank's share of the step's micro-batches; every rank gets the whole step's results."""
    results = []
    for index, batch in rank_share(batches, backend.rank, backend.world_size):
        if run.reference is not None:
            batch.ref_logps = np.concatenate([run.reference[batch.indices, 0], run.reference[batch.indices, 1]])
        logps, lengths = backend.forward_backward(batch, micro_batch_loss(run, batch))
        if index >= 0:
            results.append(_Result(index, logps, lengths.astype(np.float64), batch.ref_logps, batch.tokens))
    if backend.world_size > 1:  # every rank sees the whole step's statistics, in the one-process order
        results = sorted((r for part in backend.all_gather_object(results) for r in part), key=lambda r: r.index)
    return results


def _step_record(run: StageRun, results: list[_Result]) -> dict:
    """The step's loss and log-prob metrics from all its micro-batches."""
    if run.objective is None:
        return sft_step_metrics(np.concatenate([r.logps for r in results]), np.concatenate([r.lengths for r in results]))
    stats = PairStats.concatenate([PairStats.from_halves(r.logps, r.lengths, r.ref_logps) for r in results])
    return pair_step_metrics(run.objective, stats)


def _apply_guards(guards: Guards, record: dict, skipped: bool) -> bool:
    """Mark a non-finite step (tolerated or not) and a collapse warning in ``record``; True when collapse fired."""
    bad = not math.isfinite(record["loss"]) or skipped
    if bad:
        record["nonfinite_skipped"] = guards.nonfinite.tolerate(record["global_step"])
    collapsed = guards.collapse is not None and not bad and guards.collapse.update(record)
    if collapsed:
        record["collapse_warning"] = True
    return collapsed


def _raise_if_stopped(run: StageRun, guards: Guards, record: dict, collapsed: bool, run_dir: Path) -> None:
    """Stop on an untolerated non-finite step, or on collapse when ``stop_on_collapse`` is set."""
    step, global_step = record["step"], record["global_step"]
    if "nonfinite_skipped" in record and not record["nonfinite_skipped"]:
        last = ckpt.latest_checkpoint(run_dir)
        where = f"; last good checkpoint: {last}" if last else "; no checkpoint was written yet"
        raise UserError(f"non-finite loss or gradient at {run.name} step {step} (global step {global_step}){where}; "
                        f"--set skip_nonfinite=N tolerates N such steps")
    if collapsed and guards.stop_on_collapse:
        raise UserError(f"collapse at {run.name} step {step}: chosen and rejected LogPS both fell to twice "
                        f"their start or more (stop_on_collapse is set); lower the learning rate or alpha")


def _progress_info(run: StageRun, record: dict, collapsed: bool) -> str:
    info = f"loss {record['loss']:.4f}  "
    if run.objective is not None:
        info += f"LogPS w {record['logps/chosen_normalized']:.3f} l {record['logps/rejected_normalized']:.3f}  "
    info += f"{record['tokens_per_s']:.0f} tok/s"
    if collapsed:
        info += "  [bold red]COLLAPSE?[/]"
    return info
