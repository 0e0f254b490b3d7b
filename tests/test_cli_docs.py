"""`redi <command> -h` at 80 columns: no option name cut, defaults shown, usage names arguments as RESPONSES;
docs/cli.md and docs/config.md's recipe list are what the code prints (python scripts/sync_docs.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command

from redi.cli.help import cli_reference, command_paths, help_text
from redi.cli.main import _register_commands, app
from redi.config import Config
from redi.recipes import listing

ROOT = Path(__file__).resolve().parents[1]


def click_command(words: list[str]):
    _register_commands()
    command = get_command(app)
    for word in words:
        command = command.commands[word]
    return command


def option_block(text: str, option: str) -> str:
    """The help of one option: its line and the indented lines under it, joined into one line."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if re.match(rf"\s+(-\w, )?{re.escape(option)}\b", line))
    block = [lines[first]]
    for line in lines[first + 1:]:
        if re.match(r"\s{2,6}-", line) or not line.strip():
            break
        block.append(line)
    return " ".join(" ".join(block).split())


def test_every_command_is_listed():
    paths = {" ".join(words) for words in command_paths()}
    assert {"", "train", "eval", "compare", "grade", "data pair", "data generate", "config show",
            "config list"} <= paths


@pytest.mark.parametrize("words", command_paths(), ids=lambda w: " ".join(w) or "redi")
def test_help_fits_80_columns_and_cuts_no_option_name(words):
    text = help_text(words, columns=80)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text and "╭" not in text  # rich's ellipsis and panels (which cut names at 80 columns)
    for param in click_command(words).params:
        for name in (*param.opts, *getattr(param, "secondary_opts", [])):
            if name.startswith("-"):
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), (name, text)
    usage = text.splitlines()[0]
    assert "{" not in usage, usage
    for param in click_command(words).params:
        if param.param_type_name == "argument":
            assert f" {param.name.upper()}" in usage, usage


def test_help_is_what_a_real_80_column_terminal_prints(tmp_path):
    script = Path(sys.executable).with_name("redi")  # the console script, so the usage line says `redi`
    if not script.exists():
        pytest.skip("no redi console script beside this Python")
    real = subprocess.run([str(script), "eval", "-h"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "COLUMNS": "80"}, timeout=120)
    assert real.returncode == 0 and real.stdout == help_text(["eval"], columns=80)


def test_defaults_are_shown_and_agree_with_the_config():
    cfg = Config()
    train = help_text(["train"])
    expected = {"--stage": cfg.stage, "--objective": cfg.objective, "--output": cfg.output, "--seed": cfg.seed,
                "--save-every": cfg.save_every, "--keep-last": cfg.keep_last, "--skip-nonfinite": cfg.skip_nonfinite,
                "--max-length": f"sft {cfg.sft.max_length}, pairs {cfg.pairs.max_length}"}
    for option, value in expected.items():
        assert option_block(train, option).endswith(f"[default: {value}]"), option_block(train, option)
    assert option_block(help_text(["eval"]), "--samples").endswith("[default: 16]")
    assert option_block(help_text(["grade"]), "--timeout").endswith("[default: 5.0]")
    assert help_text(["grade"]).splitlines()[0] == "Usage: redi grade [OPTIONS] RESPONSES"


def test_docs_cli_reference_is_generated_from_the_app():
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert page == cli_reference(), "docs/cli.md is stale: run `python scripts/sync_docs.py`"


def test_docs_recipe_list_is_what_config_list_prints():
    page = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    block = page.split("<!-- recipes:start -->\n")[1].split("<!-- recipes:end -->")[0]
    assert block == f"```\n$ redi config list\n{listing()}```\n", "run `python scripts/sync_docs.py`"
