"""Fault injection at every named write point of a training run (redi.training.run_folder.WRITE_POINTS): the
run SIGKILLs itself there (``REDI_KILL_AT=point[@N]``), is resumed, and is compared with an uninterrupted run.
On the CPU in fp32 the final weights, metrics.jsonl (timings aside), data_report.json and summary.json must be
identical. The kill is deterministic: the process dies at the named instant; no timer races the run."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import available_backends

from redi.training.run_folder import WRITE_POINTS

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# Global steps: sft 1-4 (checkpoint step-2, then sft_final/), pairs 5-8 (checkpoint step-6), then final/.
ARGS = ["--config", TINY, "--stage", "both", "--set", "sft.max_steps=4", "--set", "pairs.max_steps=4",
        "--save-every", "2", "--keep-last", "2"]

# name: the kill point of each call in turn (the first trains, the others resume); a clean resume follows.
SCENARIOS = {
    "mid-sft": ["metrics-append@3"],
    "mid-pairs": ["metrics-append@7"],
    "first-data-report": ["data-report@1"],
    "sft-pairs-boundary": ["data-report@2"],  # sft_final/ is in place, stage 2 starts
    "during-sft-checkpoint-write": ["checkpoint@1"],
    "during-checkpoint-write": ["checkpoint@2"],
    "during-sft-final-write": ["sft-final"],
    "during-final-write": ["final"],
    "during-summary-write": ["summary"],
    "config-rewrite-on-resume": ["metrics-append@7", "config"],  # the issue-22 bug: an empty config.yaml
    "metrics-rewind-on-resume": ["metrics-append@7", "metrics-rewind"],
    "config-first-write": ["config"],  # no config.yaml yet: --resume refuses; the same command starts again
}
MLX_SCENARIOS = ["mid-sft", "sft-pairs-boundary", "during-checkpoint-write"]
TIMINGS = {"time_s", "tokens_per_s"}


def _cases():
    cases = [("cpu", name) for name in SCENARIOS]
    return cases + [("mlx", name) for name in MLX_SCENARIOS if "mlx" in available_backends()]


@pytest.fixture(scope="module")
def references(fork_runner, tmp_path_factory):
    """One uninterrupted run per backend, shared by every scenario."""
    done = {}

    def get(backend):
        if backend not in done:
            out = tmp_path_factory.mktemp(f"ref-{backend}") / "run"
            result = fork_runner.run(_train(backend, out))
            assert result.returncode == 0, result.output
            done[backend] = _result(out)
        return done[backend]

    return get


def _train(backend, out):
    return ["train", "--backend", backend, *ARGS, "--output", str(out)]


def _resume(out):
    return ["train", "--resume", str(out)]


def _result(run: Path) -> dict:
    from safetensors.numpy import load_file

    def read(name):  # the run's own path written as RUN, so two run folders compare
        return (run / name).read_text().replace(str(run), "RUN")

    summary = json.loads(read("summary.json"))
    summary.pop("wall_time_s")
    return {
        "metrics": [{k: v for k, v in json.loads(x).items() if k not in TIMINGS}
                    for x in read("metrics.jsonl").splitlines()],
        "weights": load_file(str(run / "final" / "model.safetensors")),
        "data_report": json.loads(read("data_report.json")),
        "summary": {k: v for k, v in summary.items() if k != "last"},  # "last" holds timings
    }


def _leftovers(run: Path) -> list[str]:
    return [p.name for folder in (run, run / "checkpoints") if folder.is_dir() for p in folder.iterdir()
            if re.fullmatch(r"\..+\.(tmp|old)-\d+", p.name)]


@pytest.mark.parametrize("backend,scenario", _cases())
def test_sigkill_then_resume_is_bit_identical(fork_runner, references, tmp_path, backend, scenario):
    reference = references(backend)
    run = tmp_path / "run"
    for index, point in enumerate(SCENARIOS[scenario]):
        killed = fork_runner.run(_resume(run) if index else _train(backend, run), REDI_KILL_AT=point)
        assert killed.returncode == -9, f"{point} was never reached: {killed.output}"
    if scenario == "config-first-write":
        refused = fork_runner.run(_resume(run))
        assert refused.returncode == 2 and "no config.yaml there" in refused.output
        assert _leftovers(run) == [f".config.yaml.tmp-{_pid(run)}"]
        finished = fork_runner.run(_train(backend, run))
    else:
        if scenario == "during-checkpoint-write":
            assert not (run / "checkpoints" / "step-6").exists() and _leftovers(run)  # never picked as a checkpoint
        finished = fork_runner.run(_resume(run))
    assert finished.returncode == 0, finished.output
    assert _leftovers(run) == []  # a killed write's temporaries are removed
    result = _result(run)
    assert result["metrics"] == reference["metrics"]  # no step repeated or skipped, bit-identical values
    assert result["data_report"] == reference["data_report"]  # both stages' sections, after any resume
    assert result["summary"] == reference["summary"]
    weights, ref_weights = result["weights"], reference["weights"]
    assert set(weights) == set(ref_weights) and all(np.array_equal(weights[k], ref_weights[k]) for k in weights)
    assert len(list((run / "checkpoints").glob("step-*"))) <= 2  # --keep-last 2


def _pid(run: Path) -> str:
    return next(p.name for p in run.iterdir() if p.name.startswith(".config.yaml.tmp-")).rsplit("-", 1)[1]


def test_every_named_write_point_has_a_kill_scenario():
    """Each kill point in the training code is listed in WRITE_POINTS, and each is killed by a scenario above."""
    sources = [ROOT / "redi" / "config.py", *sorted((ROOT / "redi" / "training").glob("*.py"))]
    named = {m for path in sources for m in re.findall(r'(?:kill_point\(|point=)"([a-z-]+)"', path.read_text())}
    assert named == set(WRITE_POINTS)
    killed = {point.split("@")[0] for points in SCENARIOS.values() for point in points}
    assert killed == set(WRITE_POINTS)
