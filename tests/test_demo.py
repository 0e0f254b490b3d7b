"""The built-in demo: the teacher's data follows the paper's rules, runs are deterministic, and REDI's effect holds.

The effect tests train real models on the CPU. The CI variant (a smaller recipe, one seed) takes ~2 minutes
on 2 cores; the full one (the shipped recipe, 3 seeds, ~20 minutes) is marked slow and runs with ``-m slow``
or ``REDI_SLOW=1``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from redi.experiments.demo import demo_config, run_demo  # noqa: E402
from redi.experiments.demo_task import build_demo_data  # noqa: E402
from redi.errors import UserError  # noqa: E402

_PROMPT = re.compile(r"^(\d+)\+(\d+)=\?$")
_BOXED = re.compile(r"\\boxed\{(\d+)\}\s*$")
_CAREFUL = re.compile(r"^(\d)\+(\d)\+(\d)=(\d+)>(\d+)$")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truth(prompt: str) -> int:
    a, b = _PROMPT.match(prompt).groups()
    return int(a) + int(b)


def _graded(generation: str, prompt: str) -> bool:
    # Independent of the generator: the boxed integer at the end equals a+b.
    m = _BOXED.search(generation)
    return bool(m) and int(m.group(1)) == _truth(prompt)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo-data")
    build_demo_data(out, 7, {"problems": 600, "eval_problems": 100, "shortcut_rate": 0.4,
                             "shortcut_error_rate": 0.5, "max_tries": 3})
    return out


def test_sampling_until_correct_and_labels(small_data):
    teacher = _rows(small_data / "teacher.jsonl")
    assert len(teacher) == 600
    for row in teacher:
        graded = [_graded(g, row["problem"]) for g in row["generations"]]
        assert graded == row["correct"]
        assert 1 <= len(graded) <= 3
        # Sampling stops at the first correct trace: only the last generation may be correct, and a problem
        # with fewer than max_tries generations was solved.
        assert not any(graded[:-1])
        assert graded[-1] or len(graded) == 3
    unsolved = sum(not any(r["correct"]) for r in teacher)
    assert 0 < unsolved < 300  # max_tries=3 with a bad teacher leaves some problems unsolved


def test_sft_rows_are_first_correct_traces(small_data):
    teacher = {r["problem_id"]: r for r in _rows(small_data / "teacher.jsonl")}
    sft = _rows(small_data / "sft.jsonl")
    assert {r["problem_id"] for r in sft} == {pid for pid, r in teacher.items() if any(r["correct"])}
    for row in sft:
        gens = teacher[row["problem_id"]]["generations"]
        first = next(i for i, g in enumerate(gens) if _graded(g, row["prompt"]))
        assert row["generation_index"] == first and row["completion"] == gens[first]
        assert row["prompt"] == teacher[row["problem_id"]]["problem"] and row["source"] == "demo-teacher"


def test_pairs_are_first_correct_and_first_wrong(small_data):
    teacher = {r["problem_id"]: r for r in _rows(small_data / "teacher.jsonl")}
    pairs = _rows(small_data / "pairs.jsonl")
    expected = {pid for pid, r in teacher.items() if any(r["correct"]) and not all(r["correct"])}
    assert {r["problem_id"] for r in pairs} == expected and len(pairs) == len(expected)
    for row in pairs:
        gens = teacher[row["problem_id"]]["generations"]
        good = [i for i, g in enumerate(gens) if _graded(g, row["prompt"])]
        bad = [i for i, g in enumerate(gens) if not _graded(g, row["prompt"])]
        assert (row["chosen_index"], row["rejected_index"]) == (good[0], bad[0])
        assert row["chosen"] == gens[good[0]] and row["rejected"] == gens[bad[0]]
        assert set(row) >= {"prompt", "chosen", "rejected", "problem_id", "chosen_index", "rejected_index"}


def test_teacher_errs_by_shortcuts(small_data):
    """Careful columns hold correct arithmetic; wrong traces go wrong first at a shortcut column."""
    teacher = _rows(small_data / "teacher.jsonl")
    shortcut_cols = cols = wrong = wrong_at_shortcut = careful = careful_ok = 0
    for row in teacher:
        digits = str(_truth(row["problem"]))[::-1]
        for gen, ok in zip(row["generations"], row["correct"]):
            lines = [ln for ln in gen.strip().split("\n") if ln.startswith(">") or _CAREFUL.match(ln)]
            cols += len(lines)
            shortcut_cols += sum(ln.startswith(">") for ln in lines)
            for col, line in enumerate(lines):
                m = _CAREFUL.match(line)
                if m and ok:
                    careful += 1
                    careful_ok += int(m[1]) + int(m[2]) + int(m[3]) == int(m[4])
                if line.split(">")[1][0] != digits[col]:
                    wrong += 1
                    wrong_at_shortcut += line.startswith(">")
                    break
    # A slip can hide in a correct trace (a lost carry put back by a confused shortcut): rare, but real.
    assert careful_ok / careful > 0.99
    assert abs(shortcut_cols / cols - 0.4) < 0.03
    assert wrong_at_shortcut / wrong > 0.95  # careful_error_rate is 0.005


def test_eval_problems_are_held_out(small_data):
    train_prompts = {r["problem"] for r in _rows(small_data / "teacher.jsonl")}
    evals = _rows(small_data / "eval.jsonl")
    assert len(evals) == 100 and not train_prompts & {r["prompt"] for r in evals}
    assert all(int(r["answer"]) == _truth(r["prompt"]) for r in evals)


def test_data_is_deterministic(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        (tmp_path / name).mkdir()
        build_demo_data(tmp_path / name, seed, {"problems": 200, "eval_problems": 20})
    for f in ("teacher.jsonl", "sft.jsonl", "pairs.jsonl", "eval.jsonl", "data_info.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / "pairs.jsonl").read_bytes() != (tmp_path / "c" / "pairs.jsonl").read_bytes()


def test_unknown_task_key_is_named(tmp_path):
    with pytest.raises(UserError, match="task.shortcut_rate"):
        build_demo_data(tmp_path, 0, {"shortcut_rat": 0.3})


# ------------------------------------------------------------------------------------------ training runs


def _tiny_demo(output: Path, seed: int = 1):
    cfg = demo_config(str(output))
    cfg.backend, cfg.seed = "cpu", seed
    cfg.sft.max_steps, cfg.pairs.max_steps = 6, 3
    cfg.task.update({"problems": 200, "eval_problems": 16, "eval_samples": 2, "eval_max_new_tokens": 48,
                     "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}})
    return cfg


def _without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "timing"}


def test_tiny_demo_run_is_deterministic_and_complete(tmp_path):
    first = run_demo(_tiny_demo(tmp_path / "one"))
    second = run_demo(_tiny_demo(tmp_path / "two"))
    assert _without_timing(first) == _without_timing(second)
    on_disk = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert _without_timing(on_disk) == json.loads(json.dumps(_without_timing(first)))
    for arm in ("after_sft", "after_redi", "continued_sft"):
        assert {"greedy_accuracy", "sampled_accuracy"} <= set(first["results"][arm])
        samples = tmp_path / "one" / "eval" / f"{arm}.jsonl"
        assert len(_rows(samples)) == 16
        assert samples.read_bytes() == (tmp_path / "two" / "eval" / f"{arm}.jsonl").read_bytes()
    for name in ("loss.png", "logps.png", "update_norm.png", "sft_loss.png"):
        assert (tmp_path / "one" / "plots" / name).stat().st_size > 10_000
    for name in ("config.yaml", "metrics.jsonl", "final/config.json", "sft_final/config.json",
                 "control/final/model.safetensors"):
        assert (tmp_path / "one" / name).exists()
    # The control sees stage 2's exact batches: at its first step (same weights, the SFT checkpoint) its
    # chosen log-probs equal REDI's.
    control = _rows(tmp_path / "one" / "control" / "metrics.jsonl")
    redi = [r for r in _rows(tmp_path / "one" / "metrics.jsonl") if r["stage"] == "pairs"]
    assert len(control) == len(redi) == 3
    assert control[0]["logps/chosen"] == pytest.approx(redi[0]["logps/chosen"], rel=1e-4)
    assert control[0]["tokens"] < redi[0]["tokens"]  # no rejected traces


# ------------------------------------------------------------------------------------------ the effect

GAP = 0.10  # REDI minus continued SFT at T = 0.6, as a fraction; measured gaps are ~0.2
# The CI variant: one seed; 3-4 digit numbers (traces half as long, learnt faster), a shorter SFT, fewer
# held-out problems, and only the two stage-2 arms the assertion compares.
CI_OVERRIDES = {"task.min_digits": 3, "task.max_digits": 4, "sft.batch_size": 32, "sft.micro_batch_size": 32,
                "sft.max_steps": 400, "task.eval_problems": 200, "task.eval_after_sft": False}


def _effect(tmp_path: Path, seed: int, overrides: dict | None = None) -> float:
    """REDI's T = 0.6 accuracy minus continued SFT's, on one seed of the shipped recipe with ``overrides``."""
    cfg = demo_config(str(tmp_path / f"seed{seed}"))
    cfg.backend, cfg.seed = "cpu", seed
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        if section == "task":
            cfg.task[name] = value
        else:
            setattr(getattr(cfg, section), name, value)
    summary = run_demo(cfg)
    print(f"seed {seed}: " + json.dumps({a: round(r["sampled_accuracy"], 4) for a, r in summary["results"].items()}))
    return summary["redi_minus_continued_sft"]["sampled_accuracy"]


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a shared 2-core box, torch's two OpenMP threads spin-wait for each other and
    this test took 12 minutes instead of 2. On an idle box one thread costs ~30%."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_redi_beats_continued_sft_ci(tmp_path, one_torch_thread):
    gap = _effect(tmp_path, 0, CI_OVERRIDES)
    assert gap >= GAP, f"REDI's T=0.6 accuracy is only {100 * gap:+.1f} points over continued SFT's"


@pytest.mark.slow
def test_redi_beats_continued_sft_full_recipe(tmp_path, request, one_torch_thread):
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get("REDI_SLOW"):
        pytest.skip("the shipped recipe on 3 seeds (~20 min on 2 cores): run with -m slow or REDI_SLOW=1")
    gaps = [_effect(tmp_path, seed) for seed in (0, 1, 2)]
    mean = sum(gaps) / len(gaps)
    assert mean >= GAP, f"REDI minus continued SFT at T=0.6, per seed: {gaps} (mean {100 * mean:+.1f} points)"
