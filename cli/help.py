"""How `redi <command> -h` looks: plain click help (cli/main.py says why), and usage lines that name
arguments as click does."""
from __future__ import annotations

from typer.core import TyperCommand


class UsageCommand(TyperCommand):
    """Typer 0.29 writes a required argument as ``{responses}`` in the usage line; this writes the argument's
    metavar (``RESPONSES``) as click and older typer do. Commands with arguments use it: ``cls=UsageCommand``."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


def command_paths() -> list[list[str]]:
    """Every command of the app as its words after `redi` ([] is `redi` itself), in the order `redi -h` lists them."""
    from typer.main import get_command

    from redi.cli.main import _register_commands, app

    _register_commands()
    paths: list[list[str]] = []

    def walk(command, words: list[str]) -> None:
        paths.append(words)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*words, name])

    walk(get_command(app), [])
    return paths


def help_text(words: list[str], columns: int = 80) -> str:
    """What `COLUMNS=<columns> redi <words> -h` prints."""
    from typer.testing import CliRunner

    from redi.cli.main import _register_commands, app

    _register_commands()
    # click wraps help at the terminal's width less 2 (at most 78): a COLUMNS=80 terminal gets 78.
    result = CliRunner().invoke(app, [*words, "-h"], env={"COLUMNS": str(columns)}, prog_name="redi",
                                terminal_width=min(columns, 80) - 2)
    if result.exit_code != 0:
        raise RuntimeError(f"redi {' '.join(words)} -h exited {result.exit_code}: {result.output}")
    return result.output


def cli_reference() -> str:
    """docs/cli.md: every command's help at 80 columns (`python scripts/sync_docs.py` writes it)."""
    parts = ["# CLI reference\n\n"
             "Every command's `-h`, as an 80-column terminal shows it. Generated from the CLI by\n"
             "`python scripts/sync_docs.py`; `tests/test_cli_docs.py` fails when it is stale.\n"]
    for words in command_paths():
        parts.append(f"\n## `{' '.join(['redi', *words])}`\n\n```text\n{help_text(words).rstrip()}\n```\n")
    return "".join(parts)
