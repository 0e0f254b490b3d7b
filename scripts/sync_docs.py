"""Regenerate every generated part of the docs from the code, in one command:

    python scripts/sync_docs.py            # rewrite what is stale
    python scripts/sync_docs.py --check    # list what is stale; exit 1 if anything is

- docs/cli.md: every command's `-h` at 80 columns (redi.cli.help.cli_reference);
- docs/config.md: the key table (`redi config show --markdown`) and the recipe list (`redi config list`);
- docs/evaluation.md: the 20-case grader comparison (scripts/compare_graders.py).
The tests that keep each in step: tests/test_cli_docs.py, tests/test_first_hour.py, tests/test_rllm_grader.py.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def between(text: str, name: str, body: str) -> str:
    """``text`` with what lies between ``<!-- name:start -->`` and ``<!-- name:end -->`` replaced by ``body``."""
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"markers {start.strip()} / {end} not found")
    head, rest = text.split(start, 1)
    return head + start + body + end + rest.split(end, 1)[1]


def grader_table() -> str:
    spec = importlib.util.spec_from_file_location("compare_graders", ROOT / "scripts" / "compare_graders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown(module.verdicts()) + "\n"


def generated() -> dict[Path, str]:
    """Each generated file's content as the code says it should be."""
    from redi.cli.help import cli_reference
    from redi.config_docs import markdown_table
    from redi.recipes import listing

    config = (DOCS / "config.md").read_text(encoding="utf-8")
    config = between(config, "config-keys", markdown_table())
    config = between(config, "recipes", f"```\n$ redi config list\n{listing()}```\n")
    evaluation = between((DOCS / "evaluation.md").read_text(encoding="utf-8"), "grader-table", grader_table())
    return {DOCS / "cli.md": cli_reference(), DOCS / "config.md": config, DOCS / "evaluation.md": evaluation}


def main(argv: list[str]) -> int:
    stale = [path for path, text in generated().items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    if "--check" in argv:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)}")
        return 1 if stale else 0
    for path, text in generated().items():
        if path in stale:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
