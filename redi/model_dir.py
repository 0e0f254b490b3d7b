"""What a saved model folder holds, whichever backend wrote it: HF files that transformers, mlx-lm and the
other backend all load. One place for the rules both backends follow when they write one."""
from __future__ import annotations

import shutil
from pathlib import Path

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

