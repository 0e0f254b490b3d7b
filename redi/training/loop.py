"""The training loop: one readable function, shared by every backend and both stages."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from rich.progress import Progress

from redi.training import checkpoint as ckpt
from redi.backend import Backend
from redi.backend import MicroBatch
from redi.training.batching import StepPlan, lr_at
from redi.config import StageConfig
from redi.data import TokenizedPair, TokenizedSeq
from redi.errors import UserError
from redi.training.guards import CollapseDetector, NonFiniteBudget
from redi.training.progress import make_progress  # noqa: F401 (the callers' import)
from redi.training.metrics import MetricsWriter, pair_step_metrics, sft_step_metrics
from redi.objectives import Objective, PairStats, sft_loss


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

    def plan(self) -> StepPlan:
        s = self.settings
        return StepPlan(len(self.examples), s.batch_size, s.micro_batch_size, s.epochs, s.max_steps, self.seed)


def micro_batch_loss(run: StageRun, batch: MicroBatch) -> Callable:
    """The loss the backend differentiates for one micro-batch, weighted by its share of the step."""
    if run.objective is None:
        return lambda ops, logps, lengths: sft_loss(ops, logps, lengths) * batch.weight
    n, objective = batch.n_pairs, run.objective

    def loss(ops, logps, lengths):
        ref_w = ref_l = None
        if batch.ref_logps is not None:
            ref_w, ref_l = ops.asarray(batch.ref_logps[:n]), ops.asarray(batch.ref_logps[n:])
        stats = PairStats(logps[:n], lengths[:n], logps[n:], lengths[n:], ref_w, ref_l)
        return objective(ops, stats)[0] * batch.weight

    return loss


def reference_logps(backend: Backend, examples: Sequence[TokenizedPair], micro_batch_size: int,
                    cache: Path, progress: Progress | None = None) -> np.ndarray:
    """Reference S for every pair, computed once with the frozen start model and cached in the run folder."""
    if cache.exists():
        ref = np.load(cache)
        if ref.shape == (len(examples), 2):
            return ref
    ref = np.zeros((len(examples), 2))
    task = progress.add_task("reference log-probs", total=len(examples), info="") if progress else None
    for start in range(0, len(examples), micro_batch_size):
        idx = np.arange(start, min(start + micro_batch_size, len(examples)))
        batch = MicroBatch([examples[i].chosen for i in idx] + [examples[i].rejected for i in idx], len(idx), 1.0, idx)
        logps, _ = backend.sequence_logps(batch)
        ref[idx, 0], ref[idx, 1] = logps[:len(idx)], logps[len(idx):]
        if progress:
            progress.advance(task, len(idx))
    if getattr(backend, "rank", 0) == 0:  # every rank computed the same values; one writes them
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, ref)
        tmp.rename(cache)
    return ref


def rank_share(batches: list[MicroBatch], rank: int, world: int) -> list[tuple[int, MicroBatch]]:
    """Rank ``rank``'s micro-batches of one step: ``rank``, ``rank + world``, ... with their indices. Every
    rank runs the same number of forward/backward passes (collectives must match), so a rank short of
    micro-batches repeats one with weight 0 and index -1: it adds nothing to the gradient or the metrics."""
    if world == 1:
        return list(enumerate(batches))
    share = [(i, batches[i]) for i in range(rank, len(batches), world)]
    while len(share) < -(-len(batches) // world):
        share.append((-1, dataclasses.replace(batches[rank % len(batches)], weight=0.0)))
    return share


def run_stage(run: StageRun, backend: Backend, run_dir: Path, writer: MetricsWriter, *, global_step: int,
              start_step: int = 0, save_every: int = 0, keep_last: int = 2,
              progress: Progress | None = None, on_checkpoint: Callable[[Path, dict], None] | None = None,
              guards: Guards | None = None) -> int:
    """Train one stage from ``start_step``; returns the global step count after the stage."""
    plan, s = run.plan(), run.settings
    total = plan.total_steps
    guards = guards or Guards()
    rank, world = getattr(backend, "rank", 0), getattr(backend, "world_size", 1)
    task = progress.add_task(f"stage {run.name}", total=total, completed=start_step, info="") if progress else None
    for step in range(start_step, total):
        t0 = time.perf_counter()
        lr = lr_at(step, total, s.learning_rate, s.warmup_ratio)
        results = []  # (micro-batch index, S, L, reference S, tokens) of the micro-batches this rank ran
        for index, batch in rank_share(plan.micro_batches(step, run.examples), rank, world):
            if run.reference is not None:
                batch.ref_logps = np.concatenate([run.reference[batch.indices, 0], run.reference[batch.indices, 1]])
            logps, lengths = backend.forward_backward(batch, micro_batch_loss(run, batch))
            if index >= 0:
                results.append((index, logps, lengths.astype(np.float64), batch.ref_logps, batch.tokens))
        if world > 1:  # every rank sees the whole step's statistics, in the one-process order
            results = sorted((r for part in backend.all_gather_object(results) for r in part), key=lambda r: r[0])
        all_logps, all_lengths = [r[1] for r in results], [r[2] for r in results]
        all_refs = [r[3] for r in results if r[3] is not None]
        tokens = sum(r[4] for r in results)
        update = backend.optimizer_step(lr, s.max_grad_norm)
        elapsed = time.perf_counter() - t0
        if run.objective is None:
            record = sft_step_metrics(np.concatenate(all_logps), np.concatenate(all_lengths))
        else:
            # Re-interleave micro-batches so the first half holds every chosen sequence of the step.
            halves = [np.split(x, 2) for x in all_logps], [np.split(x, 2) for x in all_lengths]
            logps = np.concatenate([h[0] for h in halves[0]] + [h[1] for h in halves[0]])
            lengths = np.concatenate([h[0] for h in halves[1]] + [h[1] for h in halves[1]])
            refs = None
            if all_refs:
                refs = np.concatenate([np.split(r, 2)[0] for r in all_refs] + [np.split(r, 2)[1] for r in all_refs])
            record = pair_step_metrics(run.objective, logps, lengths, refs)
        global_step += 1
        record.update({
            "grad_norm": update["grad_norm"], "update_norm": update["update_norm"], "lr": lr,
            "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "step": step + 1, "global_step": global_step, "stage": run.name, "epoch": plan.epoch_of(step),
            "time_s": elapsed,
        })
        bad = not math.isfinite(record["loss"]) or bool(update.get("skipped"))
        if bad:
            record["nonfinite_skipped"] = guards.nonfinite.tolerate(global_step)
        collapsed = guards.collapse is not None and not bad and guards.collapse.update(record)
        if collapsed:
            record["collapse_warning"] = True
        if rank == 0:
            writer.write(record)
        if bad and not record["nonfinite_skipped"]:
            last = ckpt.latest_checkpoint(run_dir)
            where = f"; last good checkpoint: {last}" if last else "; no checkpoint was written yet"
            raise UserError(f"non-finite loss or gradient at {run.name} step {step + 1} (global step {global_step}){where}; "
                            f"--set skip_nonfinite=N tolerates N such steps")
        if collapsed and guards.stop_on_collapse:
            raise UserError(f"collapse at {run.name} step {step + 1}: chosen and rejected LogPS both fell to twice "
                            f"their start or more (stop_on_collapse is set); lower the learning rate or alpha")
        if progress:
            info = f"loss {record['loss']:.4f}  "
            if run.objective is not None:
                info += f"LogPS w {record['logps/chosen_normalized']:.3f} l {record['logps/rejected_normalized']:.3f}  "
            info += f"{record['tokens_per_s']:.0f} tok/s"
            if collapsed:
                info += "  [bold red]COLLAPSE?[/]"
            progress.update(task, advance=1, info=info)
        if save_every and global_step % save_every == 0 and step + 1 < total and on_checkpoint:
            state = {"stage": run.name, "stage_step": step + 1, "global_step": global_step, "total_steps": total}
            on_checkpoint(run_dir / "checkpoints" / f"step-{global_step}", state)
            if rank == 0:
                ckpt.prune(run_dir, keep_last)
    return global_step
