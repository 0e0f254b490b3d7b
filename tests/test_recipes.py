"""Shipped recipes by name (`--config paper/sft`) from any folder; an existing path wins; `redi config list`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from redi.config import load_config
from redi.errors import UserError
from redi.experiments.compare import load_compare_config
from redi.recipes import resolve_recipe, shipped_recipes

ROOT = Path(__file__).resolve().parents[1]
REPO_RECIPES = sorted(ROOT.joinpath("configs").rglob("*.yaml"))


def redi(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "redi", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def name_of(path: Path) -> str:
    return path.relative_to(ROOT / "configs").with_suffix("").as_posix()


@pytest.mark.parametrize("spelling", ["paper/sft", "paper/sft.yaml", "configs/paper/sft.yaml"])
def test_name_resolves_to_the_shipped_file_from_an_empty_folder(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    expected = yaml.safe_load((ROOT / "configs" / "paper" / "sft.yaml").read_text())
    cfg = load_config(spelling)
    assert (cfg.output, cfg.stage, cfg.sft.epochs) == (expected["output"], "sft", expected["sft"]["epochs"])
    assert cfg.model_config == expected["model_config"]  # the authors' rope_theta edit came with it


def test_an_existing_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "sft.yaml").write_text("seed: 7\nstage: pairs\n")
    assert resolve_recipe("paper/sft.yaml") == Path("paper/sft.yaml")
    assert load_config("paper/sft.yaml").seed == 7
    assert load_config("paper/sft").seed == 42  # no file named paper/sft here: the shipped recipe


def test_unknown_name_and_escapes_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ("paper/nope", "../configs/paper/sft", "/paper/sft"):
        with pytest.raises(UserError, match="not a shipped recipe"):
            resolve_recipe(bad)


def test_compare_grid_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = yaml.safe_load((ROOT / "configs" / "paper" / "compare.yaml").read_text())
    cc = load_compare_config(Path("paper/compare"))
    assert [a.name for a in cc.arms] == [a["name"] for a in grid["arms"]]
    assert cc.recipe.objective == "redi" and cc.recipe.pairs.max_prompt_length == 800  # its recipe: redi.yaml


def test_every_shipped_recipe_has_a_short_description():
    assert {name for name, _ in shipped_recipes()} == {name_of(p) for p in REPO_RECIPES}
    for path in REPO_RECIPES:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and 10 < len(first) <= 64, path  # name + text within 80 columns


def test_cli_list_train_and_show_by_name_from_an_empty_folder(tmp_path):
    listing = redi("config", "list", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split(None, 1)[1] for line in listing.stdout.splitlines()}
    assert rows == {name_of(p): p.read_text().splitlines()[0][2:] for p in REPO_RECIPES}
    assert all(len(line) <= 80 for line in listing.stdout.splitlines())
    train = redi("train", "--config", "paper/sft", "--model", "M", "--data", "D", "--dry-run", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "output: runs/paper-sft-5ep" in train.stdout and "rope_theta: 300000" in train.stdout
    show = redi("config", "show", "--config", "paper/dpo", cwd=tmp_path)
    assert show.returncode == 0 and show.stdout.split("objective")[1].split()[0] == "dpo", show.stderr
    missing = redi("train", "--config", "paper/nope", "--dry-run", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "paper/nope" in missing.stderr
    assert not any(tmp_path.iterdir())  # nothing written into the folder
