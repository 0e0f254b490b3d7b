"""What `--resume` accepts and refuses (docs/resume.md), run as a user would: a hand edit of config.yaml, a
finished run asked for more steps, an empty config.yaml, a half-written last line in metrics.jsonl or in an
eval's samples.jsonl, a cut newest checkpoint; and the README's example stage line and shrink warning."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def finished(fork_runner, tmp_path_factory) -> Path:
    """An SFT run of 6 steps, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("finished") / "run"
    result = fork_runner.run(["train", "--config", TINY, "--backend", "cpu", "--stage", "sft", "--max-steps", "6",
                         "--save-every", "2", "--output", str(run)])
    assert result.returncode == 0, result.output
    return run


def _copy(run: Path, tmp_path: Path, stopped: bool) -> Path:
    """A copy of the run; ``stopped``: as if killed after the step-4 checkpoint (final/ and summary.json go)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    if stopped:
        shutil.rmtree(copy / "final")
        (copy / "summary.json").unlink()
    return copy


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _same_final(run: Path, reference: Path) -> bool:
    return (run / "final" / "model.safetensors").read_bytes() == (reference / "final" / "model.safetensors").read_bytes()


def _edit_config(run: Path, stage_key: str, value) -> None:
    path = run / "config.yaml"
    data = yaml.safe_load(path.read_text())
    section, key = stage_key.split(".") if "." in stage_key else (None, stage_key)
    (data[section] if section else data)[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_hand_edit_of_config_yaml_is_refused_naming_the_key(fork_runner, finished, tmp_path):
    """Regression (issue 22 §2.2): config_drift compared config.yaml with itself, so an edited learning rate
    was taken mid-run. A resume-free key (keep_last) may still change."""
    run = _copy(finished, tmp_path, stopped=True)
    _edit_config(run, "sft.learning_rate", 0.01)
    line = _one_error_line(fork_runner.run(["train", "--resume", str(run)]))
    assert "differs from the run's in: sft.learning_rate" in line
    assert not (run / "final").exists()
    _edit_config(run, "sft.learning_rate", 0.003)
    _edit_config(run, "keep_last", 3)
    resumed = fork_runner.run(["train", "--resume", str(run)])
    assert resumed.returncode == 0 and "resumed from sft step 4 of 6" in resumed.output, resumed.output
    assert _same_final(run, finished)


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_finished_run_is_not_extended_and_says_why(fork_runner, finished, tmp_path, force):
    """Regression (issue 22 §2.5): --max-steps 8 --force on a finished 4-step run said "nothing to do", exit 0."""
    run = _copy(finished, tmp_path, stopped=False)
    line = _one_error_line(fork_runner.run(["train", "--resume", str(run), "--max-steps", "8", *force]))
    assert "already finished (6 steps) and is not retrained or extended" in line
    assert "sft.max_steps" in line and "start a new run" in line
    assert _same_final(run, finished) and len((run / "metrics.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("text, what", [("", "is empty"), ("- a\n- b\n", "is not a mapping of keys")])
def test_an_empty_or_non_mapping_config_yaml_is_refused(fork_runner, finished, tmp_path, text, what):
    """Regression (issue 22 §1): an empty config.yaml read as "all defaults" and trained on them."""
    run = _copy(finished, tmp_path, stopped=True)
    (run / "config.yaml").write_text(text)
    line = _one_error_line(fork_runner.run(["train", "--resume", str(run)]))
    assert f"{run / 'config.yaml'} {what}" in line and "--config RECIPE" in line


def test_a_half_written_metrics_line_is_dropped_on_resume(fork_runner, finished, tmp_path):
    """Regression (issue 22 §3): a kill mid-append left a cut last line; --resume gave a traceback."""
    run = _copy(finished, tmp_path, stopped=True)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"loss": 4.1, "logps/ch')
    resumed = fork_runner.run(["train", "--resume", str(run)])
    assert resumed.returncode == 0, resumed.output
    assert f"warning: {run / 'metrics.jsonl'}: dropped a half-written last line (23 bytes" in resumed.output
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert _same_final(run, finished)


def test_a_cut_newest_checkpoint_falls_back_to_the_previous_one(fork_runner, finished, tmp_path):
    """Regression (issue 22 §3): a truncated step-4/model.safetensors gave a traceback on --resume."""
    run = _copy(finished, tmp_path, stopped=True)
    weights = run / "checkpoints" / "step-4" / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as fh:
        fh.truncate(size // 2)
    resumed = fork_runner.run(["train", "--resume", str(run)])
    assert resumed.returncode == 0, resumed.output
    notes = [line for line in resumed.output.splitlines() if "step-4" in line]
    assert notes == [f"warning: checkpoint {run / 'checkpoints' / 'step-4'}: model.safetensors is cut "
                     f"({size // 2:,} of {size:,} bytes); resuming from the previous intact state"]
    assert "resumed from sft step 2 of 6" in resumed.output
    assert _same_final(run, finished)


def test_an_eval_resume_drops_a_half_written_sample(fork_runner, tiny_model_dir, tmp_path):
    """Regression (issue 22 §3): a cut last line in samples.jsonl gave a traceback on the eval's resume."""
    bench, out = tmp_path / "bench.jsonl", tmp_path / "eval"
    bench.write_text("".join(json.dumps({"problem": f"{a}+1=?", "answer": str(a + 1)}) + "\n" for a in range(5)))
    args = ["eval", "--model", tiny_model_dir, "--benchmark", str(bench), "--engine", "native", "--backend", "cpu",
            "--samples", "1", "--max-new-tokens", "4", "--output", str(out), "--workers", "1"]
    assert fork_runner.run(args).returncode == 0
    samples = out / "samples.jsonl"
    lines = samples.read_text().splitlines()
    samples.write_text("".join(line + "\n" for line in lines[:-1]) + lines[-1][:30])
    again = fork_runner.run(args)
    assert again.returncode == 0, again.output
    assert f"warning: {samples}: dropped a half-written last line (30 bytes" in again.output
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(json.loads(x)["id"] for x in lines)  # the cut one again


def test_documented_stage_line_and_shrink_warning_are_what_the_code_prints(fork_runner, tmp_path):
    """Regression (issue 22 §5): micro_batch_size 4 became 1 with 7 rows and nothing said so; the documented
    example (README.md, or the docs/ page it moved to) showed another line. Its example data: 8 pair rows, one malformed, the tiny recipe's batch 8 x 4."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # wherever the example lives
    found = [m.group(1) for path in docs for m in re.finditer(r"\n```\n(pairs: 7 of 8 rows kept.*?)\n```",
                                                              path.read_text(encoding="utf-8"), re.S)]
    assert len(found) == 1
    example = found[0].splitlines()
    rows = [json.dumps({"prompt": f"{a}+1=?", "chosen": str(a + 1), "rejected": str(a + 2)}) for a in range(7)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(rows[:3] + ["{not json"] + rows[3:]) + "\n")
    result = fork_runner.run(["train", "--config", TINY, "--backend", "cpu", "--stage", "pairs", "--data", str(data),
                         "--set", "on_malformed=skip", "--max-steps", "0", "--output", str(tmp_path / "run")])
    assert result.returncode == 0, result.output
    assert len(example) == 2 and all(line in result.output.splitlines() for line in example), result.output


def test_a_damaged_metrics_line_inside_the_file_is_one_error_line(fork_runner, finished, tmp_path):
    """Only the last line can be cut by a kill; a bad line before it is named, not guessed around."""
    run = _copy(finished, tmp_path, stopped=True)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    line = _one_error_line(fork_runner.run(["train", "--resume", str(run)]))
    assert f"{run / 'metrics.jsonl'} line 3: not a JSON record" in line


def test_a_key_missing_from_the_sealed_config_compares_at_its_default(fork_runner, finished, tmp_path):
    """A run sealed by an older version lacks keys added since; at their defaults they are no change."""
    run = _copy(finished, tmp_path, stopped=True)
    state_path = run / "checkpoints" / "step-4" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert state["config"]["lm_head_chunk"] == 1024 and state["config"]["sft"]["learning_rate"] == 0.003
    del state["config"]["lm_head_chunk"]
    state_path.write_text(json.dumps(state))
    resumed = fork_runner.run(["train", "--resume", str(run)])
    assert resumed.returncode == 0 and "resumed from sft step 4 of 6" in resumed.output, resumed.output
    assert _same_final(run, finished)
