"""Entry point of the `redi` console script.

Each command lives in its own module and only parses flags; the work is done by the Python API in ``redi``.
A ``UserError`` anywhere below becomes one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import os
import sys

import typer

from redi.errors import Interrupted, UserError

app = typer.Typer(
    name="redi",
    help="Reinforcement Distillation: SFT on correct teacher traces, then learn from the wrong ones too.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help, not rich panels: rich cut option names at 80 columns (`--tensor-parall…`) and took
    # `[default: …]` in help text for markup. Every typer.Typer in cli/ passes the same (tests/test_cli_docs.py).
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"redi {version('redi')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the installed version and exit."),
) -> None:
    """Reinforcement Distillation: SFT on correct teacher traces, then learn from the wrong ones too."""


def _register_commands() -> None:
    # One line per command module; each module exposes `register(app)`.
    if app.registered_commands:  # already done (main() called twice in one process, or cli/help.py first)
        return
    from redi.cli import train as train_cmd

    train_cmd.register(app)
    # --- commands added by later issues register below this line ---
    from redi.cli import eval as eval_cmd

    eval_cmd.register(app)
    from redi.cli import compare as compare_cmd

    compare_cmd.register(app)
    from redi.cli import data as data_cmd
    data_cmd.register(app)
    from redi.cli import grade as grade_cmd
    grade_cmd.register(app)
    from redi.cli import config as config_cmd
    config_cmd.register(app)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register_commands()
    try:
        code = app(args=argv, standalone_mode=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    except Exception as err:
        # Usage errors from Typer's bundled click arrive here because standalone_mode is off.
        if hasattr(err, "show") and hasattr(err, "exit_code"):
            err.show()
            return int(err.exit_code)
        if type(err).__name__ == "Abort":
            print("error: aborted", file=sys.stderr)
            return 1
        raise
    if code == 130:  # Typer turns a Ctrl-C that no command caught into a returned 130 (not an exception)
        print("interrupted", file=sys.stderr)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
