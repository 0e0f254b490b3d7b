"""What a saved model folder holds, whichever backend wrote it: HF files that transformers, mlx-lm and the
other backend all load. One place for the rules both backends follow when they write one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from redi.errors import UserError

# Copied from the source model folder next to the weights, so the saved folder is a complete model.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def copy_tokenizer_files(source: Path, out: Path) -> None:
    """The source folder's tokenizer files into ``out`` (those ``out`` does not have yet)."""
    for name in TOKENIZER_FILES:
        if (source / name).exists() and not (out / name).exists():
            shutil.copy2(source / name, out / name)


def rope_theta_on_top(config: dict) -> dict:
    """``{"rope_theta": value}`` when ``config`` keeps it only inside ``rope_parameters`` (transformers 5),
    else ``{}``. mlx-lm reads the top-level key and silently uses 1e6 without it: log-probs off by up to
    2 nats. Written by both backends into every config.json they save, and handed to mlx-lm at load."""
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        return {"rope_theta": rope["rope_theta"]}
    return {}



def _is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "metrics.jsonl").exists() or (path / "final").is_dir())


def check_model_folder(spec: str, flag: str = "--model") -> None:
    """A local folder given as a model must be one (config.json, a JSON object), checked before anything is
    loaded or written. A training run's folder gets "did you mean RUN/final?". Hub names and single files
    (.gguf) are left to their loaders."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return
    config = path / "config.json"
    if not config.is_file():
        if _is_run_folder(path):
            final = path / "final"
            hint = (f"did you mean {final}?" if (final / "config.json").is_file()
                    else "its final/ model is not written yet (the run has not finished)")
            raise UserError(f"{flag} {spec} is a training run folder, not a model: {hint}")
        raise UserError(f"{flag} {spec}: no config.json there, so it is not a model folder (a Hugging Face "
                        "model folder holds config.json, the weights and the tokenizer files)")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{config}: not a readable JSON file ({err})") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise UserError(f"{config}: no model_type key, so transformers cannot tell which model it is")


def tokenizer_error(spec: str, err: BaseException) -> str:
    """One whole line for a tokenizer that would not load (transformers' messages run over several lines, and
    their first line stops mid-sentence)."""
    path = Path(spec).expanduser()
    if path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES[:5] + ("tokenizer.model",)):
        return (f"cannot load a tokenizer from {spec}: no tokenizer files there (tokenizer.json, or "
                "tokenizer_config.json with vocab.json and merges.txt)")
    text = " ".join(str(err).split()) or type(err).__name__
    return f"cannot load a tokenizer from {spec}: {text if len(text) <= 300 else text[:297] + '...'}"
