"""The authors' config names for REDI's options (their TRL fork's DPOConfig, R ``trl/trl/trainer/dpo2_config.py``;
redi-spec.md §2.2), accepted in config files and ``--set`` beside redi's own names (docs/paper.md)."""
from __future__ import annotations

from typing import Any

AUTHORS_ALIASES = {"reinforce_chosen_coef": "chosen_coef", "reinforce_rejected_coef": "alpha"}
# Their on/off switch for negative weighting; redi turns it on by a non-zero gamma instead.
AUTHORS_SWITCH = "use_neg_weighting"


def set_use_neg_weighting(cfg: Any, on: bool) -> None:
    """The authors' ``use_neg_weighting``: false turns the weighting off whatever gamma says (as in their
    trainer); true keeps a gamma already set, else takes their default gamma, 1."""
    if not on:
        cfg.neg_weighting_gamma = 0.0
    elif not cfg.neg_weighting_gamma:
        cfg.neg_weighting_gamma = 1.0


def switch_last(items: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """The switch applied after the other keys of one file or command line, so that the authors'
    ``use_neg_weighting: false`` beside ``neg_weighting_gamma: 1.0`` means off, in either order."""
    return sorted(items, key=lambda item: str(item[0]) == AUTHORS_SWITCH)
