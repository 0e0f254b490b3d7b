"""The recipes shipped inside the package (``redi.configs``), by name: ``paper/sft`` is
``redi/configs/paper/sft.yaml`` wherever redi is installed, so a wheel needs no clone. A path that exists
always wins over a name. Each recipe's first comment line is its one-line description (`redi config list`)."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from redi.errors import UserError

SUFFIX = ".yaml"


def shipped_root() -> Path:
    """The folder of the shipped recipes (a real folder: redi is installed unzipped, editable or as a wheel)."""
    return Path(str(files("redi.configs")))


def shipped_path(name: str) -> Path | None:
    """The shipped file for ``name`` (``paper/sft``, ``paper/sft.yaml`` or ``configs/paper/sft.yaml``), or None."""
    name = name.replace("\\", "/").removeprefix("./").removeprefix("configs/").removesuffix(SUFFIX)
    if not name or name.startswith("/") or ".." in name.split("/"):
        return None
    candidate = shipped_root() / f"{name}{SUFFIX}"
    return candidate if candidate.is_file() else None


def resolve_recipe(path: str | Path, what: str = "config file") -> Path:
    """An existing file as it is; else the shipped recipe of that name; else one error naming both places."""
    p = Path(path)
    if p.is_file():
        return p
    packaged = shipped_path(str(path))
    if packaged is not None:
        return packaged
    raise UserError(f"{what} not found: {p} (not a file, and not a shipped recipe; `redi config list` shows them)")


def description(path: Path) -> str:
    """The recipe's first comment line, without the ``#``."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def shipped_recipes() -> list[tuple[str, str]]:
    """(name, description) of every shipped recipe, sorted by name."""
    root = shipped_root()
    found = [(p.relative_to(root).as_posix().removesuffix(SUFFIX), description(p)) for p in root.rglob(f"*{SUFFIX}")]
    return sorted(found)


def listing() -> str:
    """`redi config list`: one line per shipped recipe, its name padded to a column, then its description."""
    recipes = shipped_recipes()
    width = max(len(name) for name, _ in recipes)
    return "".join(f"{name:<{width}}  {text}\n" for name, text in recipes)
