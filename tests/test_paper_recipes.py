"""configs/paper/*.yaml resolve to the paper's hyperparameters, field by field.

Three sources must agree: the recipes as `redi train --dry-run` resolves them, the table in docs/paper.md
(shipped, so users see the same numbers), and the spec's hyperparameter tables (redi-spec.md §3, read from
../shared beside the repository when it is there; CI has that copy). The spec's text is parsed here, not
copied, so a recipe that drifts from the spec fails.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from redi.config import load_config, resolved_dict, validate

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
SPEC = ROOT.parent / "shared" / "reference" / "redi-spec.md"
STAGE2 = ("redi.yaml", "symmetric.yaml", "dpo.yaml", "simpo.yaml")


def resolved(name: str) -> dict:
    cfg = validate(load_config(PAPER / name))
    return resolved_dict(cfg, "cpu")


def recipe_values(name: str) -> dict:
    """The fields the paper fixes, as this recipe resolves them (None: the recipe does not use the key)."""
    r = resolved(name)
    stage = r["sft"] if r["stage"] == "sft" else r["pairs"]
    return {
        "epochs": stage["epochs"], "batch_size": stage["batch_size"], "learning_rate": stage["learning_rate"],
        "warmup_ratio": stage["warmup_ratio"], "weight_decay": stage["weight_decay"],
        "max_length": stage["max_length"], "max_prompt_length": stage["max_prompt_length"] or None,
        "alpha": 1.0 if r.get("objective") == "symmetric" else r.get("alpha"), "beta": r.get("beta"),
        "gamma": r.get("gamma"), "start": r["model"], "model_config": r.get("model_config"),
    }


# ------------------------------------------------------------------ the spec's tables, parsed


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


def _num(pattern: str, text: str, group: int = 1) -> float:
    match = re.search(pattern, text)
    assert match, f"redi-spec.md no longer says {pattern!r}"
    return float(match.group(group).replace(",", ""))


def spec_expectations(text: str) -> dict[str, dict]:
    s31, s32 = _section(text, "### 3.1", "### 3.2"), _section(text, "### 3.2", "### 3.3")
    s33 = _section(text, "### 3.3", "## 4.")
    sft = {"batch_size": _num(r"\| Global batch \| (\d+)", s31), "learning_rate": _num(r"peak ([\d.e-]+);", s31),
           "warmup_ratio": _num(r"warmup_ratio: ([\d.]+)", s31), "weight_decay": _num(r"weight_decay=([\d.e-]+)", s31),
           "max_length": _num(r"\| Max seq length \| ([\d,]+)", s31), "max_prompt_length": None,
           "alpha": None, "beta": None, "gamma": None, "start": "Qwen/Qwen2.5-Math-1.5B",
           "model_config": {"rope_theta": _num(r"`rope_theta: ([\d.]+)`", s31),
                            "max_position_embeddings": _num(r"`max_position_embeddings: (\d+)`", s31)}}
    pairs = {"epochs": _num(r"\| Epochs \| (\d+)", s32), "batch_size": _num(r"\| Global batch \| (\d+)", s32),
             "warmup_ratio": _num(r"linear warmup for (\d+)%", s32) / 100,
             "weight_decay": _num(r"weight_decay ([\d.e-]+)", s32),
             "max_length": _num(r"`max_length: (\d+)`", s32), "max_prompt_length": _num(r"`max_prompt_length: (\d+)`", s32),
             "alpha": None, "beta": None, "gamma": None, "model_config": None}
    three, five = "runs/paper-sft-3ep/final", "runs/paper-sft-5ep/final"  # the outputs of sft-3ep.yaml, sft.yaml
    dpo = re.search(r"\| DPO \|[^\n]*?\| β=([\d.]+), LR=([\d.e-]+) \|", s33)
    simpo = re.search(r"\| SimPO \|[^\n]*?\| β=([\d.]+), γ=([\d.]+), LR=([\d.e-]+) \|", s33)
    symmetric = re.search(r"Best symmetric run: α=([\d.]+), LR=([\d.e-]+)", s33)
    final = re.search(r"\*\*α=([\d.]+), LR=([\d.e-]+)\*\*", s33)
    assert dpo and simpo and symmetric and final, "redi-spec.md §3.3's chosen values moved"
    assert _num(r"\*\*([\d.e-]+)\*\* peak", s32) == float(final.group(2))  # §3.2 and §3.3 agree
    return {
        "sft.yaml": {**sft, "epochs": _num(r"\| Epochs \| (\d+) \(final", s31)},
        "sft-3ep.yaml": {**sft, "epochs": _num(r"(\d+) for \"Qwen-SFT-1.5B-3ep\"", s31)},
        "redi.yaml": {**pairs, "start": five, "learning_rate": float(final.group(2)), "alpha": float(final.group(1))},
        "symmetric.yaml": {**pairs, "start": three, "learning_rate": float(symmetric.group(2)),
                           "alpha": float(symmetric.group(1))},
        "dpo.yaml": {**pairs, "start": three, "learning_rate": float(dpo.group(2)), "beta": float(dpo.group(1))},
        "simpo.yaml": {**pairs, "start": three, "learning_rate": float(simpo.group(3)), "beta": float(simpo.group(1)),
                       "gamma": float(simpo.group(2))},
    }


# ------------------------------------------------------------------ docs/paper.md's table, parsed


def _cell(text: str) -> float | None:
    text = text.strip()
    if text == "-":
        return None
    return float(text.split(" ")[0])


def docs_rows() -> dict[str, dict]:
    lines = (ROOT / "docs" / "paper.md").read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| recipe |"))
    names = [c.strip() for c in lines[head].strip("|").split("|")]
    rows = {}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(names, [c.strip() for c in line.strip("|").split("|")]))
        rows[cells["recipe"]] = {
            "epochs": _cell(cells["epochs"]), "batch_size": _cell(cells["global batch"]),
            "learning_rate": _cell(cells["learning rate"]), "warmup_ratio": _cell(cells["warmup ratio"]),
            "weight_decay": _cell(cells["weight decay"]), "max_length": _cell(cells["max length"]),
            "max_prompt_length": _cell(cells["max prompt length"]), "alpha": _cell(cells["α"]),
            "beta": _cell(cells["β"]), "gamma": _cell(cells["γ"]), "starts from": cells["starts from"],
        }
    return rows


RECIPES = ("sft.yaml", "sft-3ep.yaml") + STAGE2


def test_every_paper_recipe_is_in_the_docs_table():
    assert sorted(docs_rows()) == sorted(RECIPES) == sorted(p.name for p in PAPER.glob("*.yaml") if p.name != "compare.yaml")


@pytest.mark.parametrize("name", RECIPES)
def test_docs_table_matches_the_recipe(name):
    doc, got = docs_rows()[name], recipe_values(name)
    for key, value in doc.items():
        if key == "starts from":
            want_start = {"sft.yaml": "runs/paper-sft-5ep/final", "sft-3ep.yaml": "runs/paper-sft-3ep/final"}
            assert got["start"] == want_start.get(value, "Qwen/Qwen2.5-Math-1.5B"), (name, value)
        else:
            assert got[key] == value, (name, key)


@pytest.mark.skipif(not SPEC.exists(), reason="../shared/reference/redi-spec.md is not beside this checkout")
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_matches_the_spec_field_by_field(name):
    want = spec_expectations(SPEC.read_text())[name]
    got = recipe_values(name)
    for key, value in want.items():
        assert got[key] == value, f"{name}: {key} is {got[key]!r}, the spec says {value!r}"
    if name in ("sft.yaml", "sft-3ep.yaml"):  # the docs too, through the same parsed values
        assert docs_rows()[name]["learning_rate"] == want["learning_rate"]


@pytest.mark.skipif(not SPEC.exists(), reason="../shared/reference/redi-spec.md is not beside this checkout")
def test_compare_grid_carries_the_spec_tables_1_and_2():
    text = SPEC.read_text()
    numbers = {}
    for label, key in (("Qwen-SFT-1.5B-5ep (SFT", "sft-5ep"), ("**Qwen-REDI-1.5B**", "redi-5ep"),
                       ("Qwen-SFT-1.5B-3ep (start)", "sft-3ep"), ("DPO (β", "dpo"), ("SimPO (β", "simpo"),
                       ("Symmetric REDI (α", "symmetric"), ("REDI (α=0.8, LR=1e-6) |", "redi")):
        line = next(x for x in text.splitlines() if x.startswith("| " + label))
        values = [float(c.split("±")[0]) for c in line.strip("|").split("|")[1:]]
        numbers[key] = dict(zip(("math500", "aime24", "amc23", "minerva", "olympiadbench", "avg"), values))
    grid = yaml.safe_load((PAPER / "compare.yaml").read_text())
    got = {a["name"]: a["paper"] for a in grid["arms"] if "paper" in a}
    got.update({k: v["paper"] for k, v in grid["sft_checkpoints"].items()})
    assert got == numbers
    # and docs/paper.md shows the same rows
    docs = (ROOT / "docs" / "paper.md").read_text()
    for values in numbers.values():
        assert " | ".join(f"{v:.1f}" for v in values.values()) in docs


def test_dry_run_prints_the_resolved_recipe(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "redi", "train", "--config", str(PAPER / "dpo.yaml"), "--dry-run"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    first, rest = result.stdout.split("\n", 1)
    assert first == "# objective dpo: lr 2e-07, beta 0.001"
    printed = yaml.safe_load(rest)
    assert printed == resolved_dict(validate(load_config(PAPER / "dpo.yaml")), printed["backend"])
    assert printed["pairs"]["learning_rate"] == 2e-7 and "alpha" not in printed and "gamma" not in printed
    assert not list(tmp_path.iterdir())  # nothing loaded or written


# ------------------------------------------------------------------ per-objective defaults, the resolved config

# The paper's chosen values (redi-spec.md §3.3), written out by hand: not read from PAPER_DEFAULTS.
# REDI's c_w 1 and negative weighting off (gamma 0) are the authors' recipe values (redi-spec.md §2.2).
PAPER_CHOICES = {"redi": (1e-6, {"alpha": 0.8, "chosen_coef": 1.0, "neg_weighting_gamma": 0.0,
                                 "neg_weighting_detached_gamma": 0.0}),
                 "symmetric": (2e-7, {}), "dpo": (2e-7, {"beta": 0.001}),
                 "simpo": (5e-7, {"beta": 2.0, "gamma": 1.0})}


@pytest.mark.parametrize("objective", sorted(PAPER_CHOICES))
def test_objective_without_a_config_takes_the_papers_values(objective):
    from redi.cli.train import build_config
    from redi.config import objective_line

    cfg = validate(build_config(None, None, "pairs", objective, "some/model", "data.jsonl", None, None, None, None,
                                None, []))
    lr, params = PAPER_CHOICES[objective]
    assert cfg.pairs.learning_rate == lr and cfg.objective_params() == params
    line = objective_line(cfg)
    assert line.startswith(f"objective {objective}: lr {lr:g}") and "paper:" not in line
    # A value the user sets wins, and the start line says how it differs from the paper's.
    cfg = validate(build_config(None, None, "pairs", objective, "m/x", "d.jsonl", None, None, None, None, None,
                                ["pairs.learning_rate=3e-6"]))
    assert cfg.pairs.learning_rate == 3e-6 and f"lr 3e-06 (paper: {lr:g})" in objective_line(cfg)


def test_config_yaml_holds_the_resolved_values(tmp_path, capsys):
    from redi.config import apply_overrides
    from redi.training.api import train
    from redi.training.run_folder import config_drift

    run = tmp_path / "run"
    cfg = apply_overrides(load_config(ROOT / "configs" / "tiny.yaml"),
                          [f"output={run}", "stage=pairs", "objective=dpo", "pairs.max_steps=1",
                           "pairs.batch_size=4096", "pairs.micro_batch_size=4096"])
    cfg.backend = ""  # chosen at run time: cpu here
    train(cfg)
    assert "objective dpo: lr 0.001 (paper: 2e-07), beta 0.001" in capsys.readouterr().out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    kept = __import__("json").loads((run / "data_report.json").read_text())["pairs"]["kept"]
    assert saved["backend"] == "cpu"
    assert saved["beta"] == 0.001 and "alpha" not in saved and "gamma" not in saved
    assert kept < 4096 and saved["pairs"]["batch_size"] == kept
    assert saved["pairs"]["micro_batch_size"] == kept  # the row cap shrinks with the batch
    # the recorded config is a valid one that --resume accepts as unchanged
    assert config_drift(run, validate(load_config(run / "config.yaml"))) == []


def test_a_run_folder_written_before_resolution_resumes_without_drift(tmp_path):
    """Older config.yaml files hold every objective key (beta 0.0 meaning "the paper's") and backend ''."""
    from redi.config import to_dict
    from redi.training.run_folder import config_drift

    cfg = validate(load_config(ROOT / "configs" / "tiny.yaml"))
    old = {**to_dict(cfg), "backend": "", "alpha": 0.8, "beta": 0.0, "gamma": 1.0}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert config_drift(tmp_path, validate(load_config(tmp_path / "config.yaml"))) == []
    assert config_drift(tmp_path, validate(load_config(ROOT / "configs" / "tiny.yaml"))) == []
    changed = validate(load_config(ROOT / "configs" / "tiny.yaml"))
    changed.alpha = 0.5
    assert config_drift(tmp_path, changed) == ["alpha"]
