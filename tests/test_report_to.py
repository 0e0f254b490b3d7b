"""report_to: the step metrics reach TensorBoard and W&B (offline) through the real libraries, and match
metrics.jsonl. A tiny torch run of three REDI steps feeds both."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from redi.config import apply_overrides, load_config, validate
from redi.errors import UserError
from redi.training.report_to import FanOut, check_report_to

torch = pytest.importorskip("torch")
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _train(tmp_path, *overrides) -> tuple[Path, list[dict]]:
    from redi.training.api import train

    cfg = apply_overrides(load_config(TINY), ["stage=pairs", "pairs.max_steps=3", "backend=cpu", *overrides])
    cfg.output = str(tmp_path / "run")
    train(cfg)
    records = [json.loads(x) for x in Path(cfg.output, "metrics.jsonl").read_text().splitlines()]
    return Path(cfg.output), records


def test_tensorboard_event_files_hold_the_step_losses(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, records = _train(tmp_path, "report_to=[tensorboard]")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = events.Scalars("pairs/loss")
    assert [e.step for e in losses] == [r["global_step"] for r in records] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    margins = events.Scalars("pairs/rewards/margins")
    assert [e.value for e in margins] == pytest.approx([r["rewards/margins"] for r in records], rel=1e-5, abs=1e-7)


def test_wandb_offline_writes_its_run_files_with_the_logged_keys(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run, records = _train(tmp_path, "report_to=wandb", "wandb_project=redi-test", "wandb_run_name=tiny-redi")
    [offline] = list((run / "wandb").glob("offline-run-*"))
    [log] = list(offline.glob("run-*.wandb"))
    data = log.read_bytes()
    for key in ("loss", "logps/chosen_normalized", "rewards/margins", "update_norm", "redi-test", "tiny-redi"):
        assert key.encode() in data, key


def test_report_to_is_checked_before_training():
    with pytest.raises(UserError, match="unknown target 'tensorbord'"):
        validate(apply_overrides(load_config(TINY), ["report_to=tensorboard,tensorbord"]))
    check_report_to(["tensorboard", "wandb"])  # both installed with the test extra


def test_report_to_from_the_command_line_is_a_list():
    assert apply_overrides(load_config(TINY), ["report_to=tensorboard,wandb"]).report_to == ["tensorboard", "wandb"]
    assert apply_overrides(load_config(TINY), ["report_to=[wandb]"]).report_to == ["wandb"]
    assert load_config(TINY).report_to == []


def test_fan_out_closes_every_sink_and_reports_the_failure():
    closed = []

    class Sink:
        def __init__(self, fail):
            self.fail = fail

        def write(self, record):
            closed.append(("write", record["x"]))

        def close(self):
            closed.append("close")
            if self.fail:
                raise OSError("disk full")

    fan = FanOut([Sink(True), Sink(False)])
    fan.write({"x": 1})
    with pytest.raises(OSError, match="disk full"):
        fan.close()
    assert closed == [("write", 1), ("write", 1), "close", "close"]
