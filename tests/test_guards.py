"""Guards and validation through the real loop, with a scripted numpy backend (no torch needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from redi.training.api import train
from redi.objectives import NumpyOps
from redi.config import Config, apply_overrides, load_config, validate
from redi.errors import UserError
from redi.training.guards import CollapseDetector

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


class ScriptedBackend:
    """Implements the backend protocol with scripted statistics: per step, the chosen and rejected
    per-token log-probs and the update per unit lr are taken from the script; NaN where the script says so."""

    name = "scripted"
    ops = NumpyOps
    rank, world_size = 0, 1

    def __init__(self, chosen, rejected, update, nan_steps=()):
        self.chosen, self.rejected, self.update = chosen, rejected, update
        self.nan_steps, self.step = set(nan_steps), 0

    def load(self, model_path, *, precision, lm_head_chunk):
        self.model_path = model_path

    def init_optimizer(self, *, weight_decay):
        self.step = 0

    def forward_backward(self, batch, loss_fn):
        lengths = np.array([float(len(s.completion)) for s in batch.seqs])
        n = batch.n_pairs
        per_token = np.array([self.chosen[self.step]] * n + [self.rejected[self.step]] * n)
        logps = per_token * lengths
        if self.step + 1 in self.nan_steps:
            logps[0] = np.nan
        loss_fn(self.ops, logps, lengths)
        return logps, lengths

    def sequence_logps(self, batch):
        return self.forward_backward(batch, lambda *a: 0.0)

    def optimizer_step(self, lr, max_grad_norm):
        self.step += 1
        bad = self.step in self.nan_steps
        # The script gives the update per unit lr (Adam's normalised step); the schedule scales it, as in real runs.
        return {"grad_norm": float("nan") if bad else 1.0, "update_norm": self.update[self.step - 1] * lr,
                **({"skipped": 1.0} if bad else {})}

    def save_model(self, path):
        Path(path, "config.json").write_text("{}")

    def save_checkpoint(self, path):
        self.save_model(path)
        Path(path, "optimizer.json").write_text(json.dumps({"step": self.step}))

    def load_checkpoint(self, path):
        self.step = json.loads(Path(path, "optimizer.json").read_text())["step"]

    def all_gather_object(self, obj):
        return [obj]

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, eos_id, batch_size=64):
        return [[eos_id] for _ in prompts]

    def num_parameters(self):
        return 1000

    def num_trainable_parameters(self):
        return 1000


def _cfg(tmp_path, *overrides):
    cfg = load_config(TINY)
    cfg.output = str(tmp_path / "run")
    return apply_overrides(cfg, ["stage=pairs", "pairs.warmup_ratio=0", *overrides])


def _records(cfg):
    return [json.loads(x) for x in Path(cfg.output, "metrics.jsonl").read_text().splitlines()]


STEADY = np.linspace(-0.5, -0.8, 30)  # the benign REDI regime: both LogPS fall slowly, updates flat
COLLAPSE_C = np.concatenate([np.full(15, -0.5), np.linspace(-0.5, -3.0, 15)])
COLLAPSE_R = np.concatenate([np.full(15, -1.0), np.linspace(-1.0, -4.0, 15)])
COLLAPSE_U = np.concatenate([np.full(15, 0.01), np.geomspace(0.01, 1.0, 15)])


def test_nonfinite_step_stops_and_names_step_and_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "pairs.max_steps=8", "save_every=2")
    backend = ScriptedBackend(STEADY, STEADY - 0.5, np.full(30, 0.01), nan_steps={5})
    with pytest.raises(UserError, match=r"non-finite loss or gradient at pairs step 5 .*last good checkpoint: .*step-4"):
        train(cfg, backend=backend)
    assert (Path(cfg.output) / "checkpoints" / "step-4" / "trainer_state.json").exists()


def test_skip_nonfinite_tolerates_and_logs(tmp_path):
    cfg = _cfg(tmp_path, "pairs.max_steps=8", "skip_nonfinite=2")
    summary = train(cfg, backend=ScriptedBackend(STEADY, STEADY - 0.5, np.full(30, 0.01), nan_steps={3, 6}))
    assert summary["nonfinite_steps_skipped"] == [3, 6]
    assert [r.get("nonfinite_skipped", False) for r in _records(cfg)] == [False, False, True, False, False, True, False, False]
    cfg3 = _cfg(tmp_path / "b", "pairs.max_steps=8", "skip_nonfinite=1")
    with pytest.raises(UserError, match="step 6"):
        train(cfg3, backend=ScriptedBackend(STEADY, STEADY - 0.5, np.full(30, 0.01), nan_steps={3, 6}))


def test_collapse_alarm_fires_on_collapse_only(tmp_path):
    cfg = _cfg(tmp_path, "pairs.max_steps=30", "pairs.batch_size=4", "pairs.micro_batch_size=4")
    summary = train(cfg, backend=ScriptedBackend(COLLAPSE_C, COLLAPSE_R, COLLAPSE_U))
    assert summary["collapse_warnings"] and min(summary["collapse_warnings"]) > 15
    benign = _cfg(tmp_path / "b", "pairs.max_steps=30", "pairs.batch_size=4", "pairs.micro_batch_size=4")
    assert train(benign, backend=ScriptedBackend(STEADY, STEADY - 0.5, np.full(30, 0.01)))["collapse_warnings"] == []
    stop = _cfg(tmp_path / "c", "pairs.max_steps=30", "pairs.batch_size=4", "pairs.micro_batch_size=4", "stop_on_collapse=true")
    with pytest.raises(UserError, match="collapse at pairs step"):
        train(stop, backend=ScriptedBackend(COLLAPSE_C, COLLAPSE_R, COLLAPSE_U))


def test_collapse_detector_needs_all_three_signals():
    d = CollapseDetector(window=4, drop=0.1, growth=2.0)
    rows = [(-0.5, -1.0, 0.01), (-0.5, -1.0, 0.01), (-0.9, -1.5, 0.05), (-1.0, -1.6, 0.06)]
    fired = [d.update({"step": i + 1, "logps/chosen_normalized": c, "logps/rejected_normalized": r, "update_norm": u})
             for i, (c, r, u) in enumerate(rows)]
    assert fired == [False, False, False, True]
    d = CollapseDetector(window=4, drop=0.1, growth=2.0)
    flat_updates = [(c, r, 0.01) for c, r, _ in rows]
    assert not any(d.update({"step": i + 1, "logps/chosen_normalized": c, "logps/rejected_normalized": r,
                             "update_norm": u}) for i, (c, r, u) in enumerate(flat_updates))


def test_resume_refuses_changed_config_and_names_keys(tmp_path):
    cfg = _cfg(tmp_path, "pairs.max_steps=4", "save_every=2")
    train(cfg, backend=ScriptedBackend(STEADY, STEADY - 0.5, np.full(30, 0.01)))
    changed = apply_overrides(_cfg(tmp_path, "pairs.max_steps=4", "save_every=2"), ["pairs.learning_rate=0.5", "alpha=0.5"])
    with pytest.raises(UserError, match=r"differs from the run's in: alpha, pairs.learning_rate \(--force"):
        train(changed, resume=True, backend=ScriptedBackend(STEADY, STEADY - 0.5, np.full(30, 0.01)))
    train(changed, resume=True, force=True, backend=ScriptedBackend(STEADY, STEADY - 0.5, np.full(30, 0.01)))


@pytest.mark.parametrize("overrides, message", [
    (["pairs.learning_rate=-1"], "pairs.learning_rate' is out of range"),
    (["sft.micro_batch_size=3"], "multiple of"),
    (["precision=half"], "precision"),
    (["stage=dpo"], "unknown stage 'dpo'"),
    (["objective=kto"], "unknown objective 'kto'"),
    (["collapse_window=1"], "collapse_window"),
])
def test_config_validation_messages(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(apply_overrides(Config(), overrides))


def test_alpha_outside_unit_interval_warns(capsys):
    validate(apply_overrides(Config(), ["alpha=1.5"]))
    assert "alpha=1.5 is outside [0, 1]" in capsys.readouterr().err


def test_unwritable_output_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = _cfg(tmp_path)
    cfg.output = str(blocker / "run")
    with pytest.raises(UserError, match="not writable"):
        train(cfg, backend=ScriptedBackend(STEADY, STEADY, STEADY))


def test_disk_room_is_checked_before_training(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    cfg = _cfg(tmp_path, "pairs.max_steps=2", "save_every=1")
    with pytest.raises(UserError, match="not enough disk space"):
        train(cfg, backend=ScriptedBackend(STEADY, STEADY, np.full(30, 0.01)))
    assert not (Path(cfg.output) / "metrics.jsonl").read_text().strip()


def test_data_row_errors_name_file_and_row(tmp_path):
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "1+1=", "chosen": "", "rejected": "3"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path, f"data={data}")
    with pytest.raises(UserError, match=r"pairs.jsonl row 2: empty 'chosen'"):
        train(cfg, backend=ScriptedBackend(STEADY, STEADY, STEADY))


def test_conversational_data_without_chat_template_is_named(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template")
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = _cfg(tmp_path, f"model={model}")  # builtin:tiny data is conversational
    with pytest.raises(UserError, match=r"needs a chat template, but the tokenizer at .*model has none"):
        train(cfg, backend=ScriptedBackend(STEADY, STEADY, STEADY))


def test_missing_tokenizer_files_are_named(tmp_path):
    model = tmp_path / "empty-model"
    model.mkdir()
    cfg = _cfg(tmp_path, f"model={model}")
    with pytest.raises(UserError, match="empty-model"):
        train(cfg, backend=ScriptedBackend(STEADY, STEADY, STEADY))


@pytest.mark.parametrize("run, fires", [("sym3e5", True), ("sym1e4", True), ("redi1e5", False)])
def test_collapse_defaults_calibrated_on_the_demo(run, fires):
    """Recorded stage-2 metrics of the demo (100 steps from its SFT checkpoint, 10 warmup steps): symmetric
    REDI at lr 3e-5 and 1e-4 collapses (LogPS -0.1 -> -1.5 and -3); REDI alpha 0.8 at 1e-5 does not."""
    cfg = Config()
    detector = CollapseDetector(cfg.collapse_window, cfg.collapse_drop, cfg.collapse_growth, cfg.collapse_severe_drop,
                                ignore_before=10)
    path = Path(__file__).parent / "fixtures" / f"collapse_demo_{run}.jsonl"
    fired = [r["step"] for r in map(json.loads, path.read_text().splitlines()) if detector.update(r)]
    assert bool(fired) == fires, fired
