"""Guards and validation through the real loop, with a scripted numpy backend (no torch needed)."""
from __future__ import annotations

import json
import shutil
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
    pads_micro_batches = False

    def __init__(self, chosen, rejected, update, nan_steps=()):
        self.chosen, self.rejected, self.update = chosen, rejected, update
        self.nan_steps, self.step = set(nan_steps), 0

    def load(self, model_path, *, precision, lm_head_chunk, model_config=None):
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

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, eos_id, batch_size=64, stop_ids=()):
        return [[eos_id] for _ in prompts]

    def num_parameters(self):
        return 1000

    def micro_batch_token_budget(self, longest):
        return 1 << 24

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


def test_collapse_detector_rule_by_hand():
    """Both LogPS averaged over the last `window` steps must be `drop` below and `ratio`x the start average."""
    def feed(rows, **kw):
        d = CollapseDetector(**kw)
        return [d.update({"step": i + 1, "logps/chosen_normalized": c, "logps/rejected_normalized": r})
                for i, (c, r) in enumerate(rows)]

    # start means (-0.1, -0.2); at step 4 the last two average (-0.25, -0.45): 0.15 and 0.25 below, 2.5x and 2.25x.
    rows = [(-0.1, -0.2), (-0.1, -0.2), (-0.2, -0.4), (-0.3, -0.5)]
    assert feed(rows, window=2, drop=0.1, ratio=2.0) == [False, False, False, True]
    # Only the chosen side falls: no alarm (a collapse is both falling).
    assert not any(feed([(c, -0.2) for c, _ in rows], window=2, drop=0.1, ratio=2.0))
    # A fall of 0.3 from -0.5 (1.6x) is the benign regime; a doubling from -0.01 is under the 0.1 floor.
    assert not any(feed([(-0.5, -1.0)] * 2 + [(-0.8, -1.3)] * 4, window=2, drop=0.1, ratio=2.0))
    assert not any(feed([(-0.01, -0.02)] * 2 + [(-0.05, -0.08)] * 4, window=2, drop=0.1, ratio=2.0))
    # Warmup steps are not part of the start average.
    assert feed([(-0.5, -0.9)] * 2 + rows, window=2, drop=0.1, ratio=2.0, ignore_before=2)[-1]


def test_resume_refuses_changed_config_and_names_keys(tmp_path):
    cfg = _cfg(tmp_path, "pairs.max_steps=4", "save_every=2")
    train(cfg, backend=ScriptedBackend(STEADY, STEADY - 0.5, np.full(30, 0.01)))
    shutil.rmtree(tmp_path / "run" / "final")  # as if stopped after the step-2 checkpoint (a finished run is
    (tmp_path / "run" / "summary.json").unlink()  # never changed: test_first_hour.py)
    changed = apply_overrides(_cfg(tmp_path, "pairs.max_steps=4", "save_every=2"), ["pairs.learning_rate=0.5", "alpha=0.5"])
    with pytest.raises(UserError, match=r"differs from the run's in: alpha, pairs.learning_rate \(--force"):
        train(changed, resume=True, backend=ScriptedBackend(STEADY, STEADY - 0.5, np.full(30, 0.01)))
    train(changed, resume=True, force=True, backend=ScriptedBackend(STEADY, STEADY - 0.5, np.full(30, 0.01)))


@pytest.mark.parametrize("overrides, message", [
    (["pairs.learning_rate=-1"], "pairs.learning_rate' is out of range"),
    (["sft.micro_batch_size=-1"], "sft.micro_batch_size' is out of range"),
    (["pairs.micro_batch_tokens=lots"], "'pairs.micro_batch_tokens' must be auto or a number of tokens"),
    (["precision=half"], "precision"),
    (["stage=dpo"], "unknown stage 'dpo'"),
    (["objective=kto"], "unknown objective 'kto'"),
    (["collapse_window=0"], "collapse_window"),
    (["sft.max_prompt_length=64"], "'sft.max_prompt_length' does nothing"),
    (["precision=bf16", "backend=cpu"], "cpu backend computes in fp32"),
    (["optim_state_dtype=fp16"], "optim_state_dtype' must be fp32 or bf16"),
    (["report_to=tensorbord"], "unknown target 'tensorbord'"),
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
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+1="}], "chosen": [{"role": "assistant", "content": "2"}],
                                "rejected": [{"role": "assistant", "content": "3"}]}) + "\n")
    cfg = _cfg(tmp_path, f"model={model}", f"data={data}")
    with pytest.raises(UserError, match=r"needs a chat template, but the tokenizer at .*model has none"):
        train(cfg, backend=ScriptedBackend(STEADY, STEADY, STEADY))


def test_missing_tokenizer_files_are_named(tmp_path):
    model = tmp_path / "empty-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')  # a model folder, but no tokenizer files
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    cfg = _cfg(tmp_path, f"model={model}", f"data={data}")
    with pytest.raises(UserError, match="cannot load a tokenizer from .*empty-model"):
        train(cfg, backend=ScriptedBackend(STEADY, STEADY, STEADY))


FIXTURES = Path(__file__).parent / "fixtures"
REPLAYS = {
    # The demo's stage 2 (100 steps from its SFT checkpoint, 10 warmup steps): symmetric REDI at lr 3e-5 and
    # 1e-4 collapses (LogPS -0.1 -> -1.4 and -3); REDI alpha 0.8 at 1e-5 does not.
    "demo sym 3e-5": (FIXTURES / "collapse_demo_sym3e5.jsonl", True),
    "demo sym 1e-4": (FIXTURES / "collapse_demo_sym1e4.jsonl", True),
    "demo redi 1e-5": (FIXTURES / "collapse_demo_redi1e5.jsonl", False),
    # The default `redi compare` grid on another machine (tests/fixtures/missed-collapse/README.md): the
    # symmetric-high arm collapsed (42.2% at step 25, 8.8% at the end; chosen LogPS -0.10 -> -0.62) and the
    # old update-norm rule missed it; the healthy arms of the same grid must stay silent.
    "compare symmetric-high": (FIXTURES / "missed-collapse" / "symmetric-high" / "metrics.jsonl", True),
    "compare symmetric-low": (FIXTURES / "missed-collapse" / "symmetric-low" / "metrics.jsonl", False),
    "compare redi-a0.8": (FIXTURES / "missed-collapse" / "redi-a0.8" / "metrics.jsonl", False),
}


FIRST_FIRE = {"demo sym 3e-5": 41, "demo sym 1e-4": 25, "compare symmetric-high": 41}


@pytest.mark.parametrize("name", list(REPLAYS))
def test_collapse_alarm_on_replayed_runs(name):
    path, fires = REPLAYS[name]
    detector = CollapseDetector.from_config(Config(), ignore_before=10)
    fired = [r["step"] for r in map(json.loads, path.read_text().splitlines()) if detector.update(r)]
    assert bool(fired) == fires, fired
    if fires:  # sustained: once it fires, it stays on for most of the rest of the run
        assert len(fired) > 0.8 * (100 - fired[0]), fired
        assert fired[0] == FIRST_FIRE[name]  # the steps docs/checkpoints.md and guards.py quote


@pytest.mark.parametrize("window, drop, ratio", [(5, 0.05, 1.5), (20, 0.2, 2.0), (10, 0.1, 1.5), (5, 0.2, 2.0)])
def test_collapse_decisions_do_not_hang_on_the_defaults(window, drop, ratio):
    for name, (path, fires) in REPLAYS.items():
        detector = CollapseDetector(window, drop, ratio, ignore_before=10)
        fired = any([detector.update(r) for r in map(json.loads, path.read_text().splitlines())])
        assert fired == fires, name


def test_a_run_folder_from_before_the_new_collapse_rule_still_loads_and_resumes(tmp_path, capsys):
    from redi.training.run_folder import config_drift

    old = FIXTURES / "missed-collapse" / "symmetric-high" / "config.yaml"  # has collapse_growth, collapse_severe_drop
    cfg = load_config(old)
    assert "key 'collapse_growth' is ignored" in capsys.readouterr().err
    assert (cfg.collapse_window, cfg.collapse_ratio) == (20, Config().collapse_ratio)  # as saved; the new key defaults
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(old.read_text())
    assert config_drift(run, cfg) == []
