"""``micro_batch_tokens``: a step cut into micro-batches by a token budget trains exactly as one row per
micro-batch. Each micro-batch's loss is weighted by its share of the step's denominator (pairs, or completion
tokens for SFT), so how the step is cut must not change the step's loss or gradient: checked to 1e-6 for SFT,
REDI, DPO and SimPO on every backend this machine runs, against the same backend with micro_batch_size 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import available_backends
from redi.backend import make_backend
from redi.config import StageConfig
from redi.data import TokenizedPair, TokenizedSeq
from redi.errors import UserError
from redi.layer_checkpointing import micro_batch_tokens_value, token_budget
from redi.objectives import make_objective
from redi.training.batching import StepPlan, example_tokens, token_groups
from redi.training.loop import StageRun, _accumulate, _step_record, reference_logps, resolve_token_budget

N_ROWS = 9
# tokens: SFT rows hold 4-70 tokens, pairs twice that, so micro-batches hold 1-5 rows
BUDGET = {"sft": 150, "redi": 300, "dpo": 300, "simpo": 300}


def _seq(rng, vocab: int) -> TokenizedSeq:
    p, c = int(rng.integers(0, 25)), int(rng.integers(4, 45))
    return TokenizedSeq(rng.integers(3, vocab, p).astype(np.int32), rng.integers(3, vocab, c).astype(np.int32))


def _examples(kind: str, vocab: int) -> list:
    rng = np.random.default_rng(7)
    if kind == "sft":
        return [_seq(rng, vocab) for _ in range(N_ROWS)]
    return [TokenizedPair(_seq(rng, vocab), _seq(rng, vocab)) for _ in range(N_ROWS)]


def _grads(backend) -> dict[str, np.ndarray]:
    if backend.name == "mlx":
        return {k: np.array(v) for k, v in backend._grads.items()}
    return {n: p.grad.numpy().copy() for n, p in backend.model.named_parameters() if p.grad is not None}


def _step(name: str, model_dir: str, kind: str, budget: int, cap: int, tmp: Path):
    """One step's loss, gradients and micro-batch sizes (in rows) with the given budget and row cap."""
    backend = make_backend(name, seed=0)
    backend.load(model_dir, precision="fp32", lm_head_chunk=16)
    backend.init_optimizer(weight_decay=0.0)
    examples = _examples(kind, 64)
    settings = StageConfig(batch_size=N_ROWS, micro_batch_size=cap, micro_batch_tokens=str(budget))
    objective = None if kind == "sft" else make_objective(kind)
    run = StageRun("sft" if kind == "sft" else "pairs", settings, examples, objective, seed=3)
    resolve_token_budget(run, backend)
    plan = run.plan()
    if objective is not None and objective.needs_reference:
        run.reference = reference_logps(backend, examples, plan, tmp / f"ref-{budget}-{cap}.npy")
    batches = plan.micro_batches(0, examples)
    results = _accumulate(run, backend, batches)
    return _step_record(run, results)["loss"], _grads(backend), [len(b.indices) for b in batches], run.reference


@pytest.mark.parametrize("kind", ["sft", "redi", "dpo", "simpo"])
@pytest.mark.parametrize("name", available_backends())
def test_token_budget_gives_the_one_row_step(name, kind, tiny_model_dir, tmp_path):
    loss_1, grads_1, sizes_1, ref_1 = _step(name, tiny_model_dir, kind, budget=0, cap=1, tmp=tmp_path)
    loss_b, grads_b, sizes_b, ref_b = _step(name, tiny_model_dir, kind, budget=BUDGET[kind], cap=0, tmp=tmp_path)
    assert sizes_1 == [1] * N_ROWS
    assert len(sizes_b) < N_ROWS and max(sizes_b) >= 3  # the budget really packed rows together
    assert abs(loss_1) > 1e-2
    assert abs(loss_b - loss_1) <= 1e-6, (loss_b, loss_1)
    if ref_1 is not None:  # DPO's reference pass is cut by the same budget
        np.testing.assert_allclose(ref_b, ref_1, atol=1e-4, rtol=1e-6)
    assert set(grads_b) == set(grads_1)
    assert max(np.abs(g).max() for g in grads_1.values()) > 1e-3
    for key in grads_1:
        np.testing.assert_allclose(grads_b[key], grads_1[key], atol=1e-6, rtol=1e-5, err_msg=key)


def test_micro_batches_respect_the_budget_and_the_row_cap():
    rng = np.random.default_rng(0)
    examples = [_seq(rng, 50) for _ in range(40)]
    for budget, cap in ((100, 0), (100, 2), (0, 3), (1, 0)):
        plan = StepPlan(40, 40, cap, 1.0, 0, 5, micro_batch_tokens=budget)
        batches = plan.micro_batches(0, examples)
        assert sorted(i for b in batches for i in b.indices) == list(range(40))  # every row, once
        for b in batches:
            assert not cap or len(b.indices) <= cap
            assert not budget or len(b.indices) == 1 or b.tokens <= budget
        assert sum(b.weight for b in batches) == pytest.approx(1.0)
    # greedy: a group closes only when the next row would not fit
    assert token_groups([5, 5, 5, 20, 1, 1], 10) == [[0, 1], [2], [3], [4, 5]]
    assert token_groups([5, 5, 5, 20, 1, 1], 0, 4) == [[0, 1, 2, 3], [4, 5]]
    # right-padded rows cost count x longest: 2 x 6 = 12 > 11 closes the group that 2 + 6 = 8 would not
    assert token_groups([2, 6, 6], 11) == [[0, 1], [2]]
    assert token_groups([2, 6, 6], 11, padded=True) == [[0], [1], [2]]
    padded_plan = StepPlan(40, 40, 0, 1.0, 0, 5, micro_batch_tokens=100, padded=True)
    for b in padded_plan.micro_batches(0, examples):
        assert len(b.indices) == 1 or len(b.seqs) * max(s.length for s in b.seqs) <= 100
    pair = TokenizedPair(examples[0], examples[1])
    assert example_tokens(pair) == examples[0].length + examples[1].length


def test_token_budget_search_and_key():
    # 1 kB per token over a 10 kB constant: 90 tokens fit in 100 kB, 0 in 5 kB (then 1: a row goes alone)
    assert token_budget(100_000, lambda t: 10_000 + 1_000 * t) == 90
    assert token_budget(5_000, lambda t: 10_000 + 1_000 * t) == 1
    assert token_budget(None, lambda t: t) == 1 << 24
    assert micro_batch_tokens_value("auto") is None and micro_batch_tokens_value("4096") == 4096
    with pytest.raises(UserError, match="'pairs.micro_batch_tokens' must be auto"):
        micro_batch_tokens_value("-3", "pairs.micro_batch_tokens")


@pytest.mark.parametrize("name", available_backends())
def test_auto_budget_grows_with_free_memory(name, tiny_model_dir, monkeypatch):
    """auto reads the host's available memory on a CPU: more memory, a larger budget, and a long-row
    budget is never above a short-row one (MLX's unfused attention grows with the row width)."""
    import redi.layer_checkpointing as lc

    backend = make_backend(name, seed=0)
    backend.load(tiny_model_dir, precision="fp32", lm_head_chunk=16)
    backend.init_optimizer(weight_decay=0.0)
    budgets = []
    for gb in (1, 4):
        monkeypatch.setattr(lc, "host_available_bytes", lambda gb=gb: gb * 1e9)
        budgets.append(backend.micro_batch_token_budget(64))
    assert 1 < budgets[0] < budgets[1]
    assert backend.micro_batch_token_budget(4096) <= budgets[1]
