"""`redi config show`: every key of the resolved configuration, its default, and (--markdown) what it does;
`redi config list`: the shipped recipes, by name."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="The shipped recipes and the configuration keys.", no_args_is_help=True,
                             rich_markup_mode=None)
    app.add_typer(config_app, name="config")

    @config_app.command("show")
    def show(
        config: Optional[Path] = typer.Option(None, "--config", help="YAML recipe to resolve: a file or a shipped name (paper/sft; default: the built-in defaults)."),
        overrides: List[str] = typer.Option([], "--set", help="KEY=VALUE, as in redi train."),
        markdown: bool = typer.Option(False, "--markdown", help="The key table of docs/config.md: key, default, what it does, which backend reads it."),
    ) -> None:
        """Print every config key with its resolved value; * marks keys that differ from the default."""
        from redi.config import apply_overrides, load_config, validate
        from redi.config_docs import markdown_table, text_listing

        if markdown:
            typer.echo(markdown_table(), nl=False)
            return
        cfg = validate(apply_overrides(load_config(config), overrides))
        typer.echo(text_listing(cfg), nl=False)

    @config_app.command("list")
    def list_recipes() -> None:
        """Print the shipped recipes: the name --config takes (paper/sft) and what each is for."""
        from redi.recipes import listing

        typer.echo(listing(), nl=False)
