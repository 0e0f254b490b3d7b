"""Built-in models and data sets, made locally from the seed: ``model: builtin:NAME``, ``data: builtin:NAME``.

They are written into the run folder, so a run needs no network and no files from elsewhere.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from redi.errors import UserError
from redi.gguf import model_folder
from redi.tiny import TinyQwen2, build_model

PREFIX = "builtin:"


def _tiny_data(out: Path, seed: int, task: dict) -> None:
    """Addition with one correct and one wrong worked answer per problem, as chat rows (tests, CI)."""
    rng = np.random.default_rng(seed)
    n = int(task.get("problems", 96))
    sft, pairs = [], []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(10, 1000, size=2))
        wrong = a + b + int(rng.choice([-10, -1, 1, 10]))
        prompt = [{"role": "user", "content": f"{a}+{b}=?"}]
        right_text = f"{a}+{b}={a + b}\n\\boxed{{{a + b}}}"
        wrong_text = f"{a}+{b}={wrong}\n\\boxed{{{wrong}}}"
        sft.append({"prompt": prompt, "completion": [{"role": "assistant", "content": right_text}], "problem_id": i})
        pairs.append({
            "prompt": prompt, "chosen": [{"role": "assistant", "content": right_text}],
            "rejected": [{"role": "assistant", "content": wrong_text}], "problem_id": i,
        })
    for name, rows in (("sft", sft), ("pairs", pairs)):
        with (out / f"{name}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


# name -> (writer of sft/pairs files). Tasks register here; the demo task adds itself on import.
DATA_BUILDERS: dict[str, Callable[[Path, int, dict], None]] = {"tiny": _tiny_data}
MODEL_SHAPES: dict[str, TinyQwen2] = {"tiny": TinyQwen2()}
MODEL_ALPHABETS: dict[str, str] = {}


def _load_registrations() -> None:
    # Optional tasks register themselves on import; missing ones simply are not offered.
    import importlib

    for module in ("redi.experiments.demo_task",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def _registered(spec: str, registry: dict, kind: str) -> str:
    """The NAME of ``builtin:NAME`` once the built-in tasks have registered; an unknown one is refused."""
    _load_registrations()
    name = spec[len(PREFIX):]
    if name not in registry:
        raise UserError(f"unknown built-in {kind} '{spec}'; choose one of: {', '.join(PREFIX + k for k in registry)}")
    return name


def _materialise(spec: str, registry: dict, kind: str, run_dir: Path, build: Callable[[str, Path], None]) -> str:
    """A ``builtin:NAME`` spec is built into ``run_dir/builtin-KIND`` and that path returned; any other spec as is."""
    if not spec.startswith(PREFIX):
        return spec
    name = _registered(spec, registry, kind)
    out = run_dir / f"builtin-{kind}"
    build(name, out)
    return str(out)


def materialise_model(spec: str, run_dir: Path, seed: int, task: dict) -> str:
    def build(name: str, out: Path) -> None:
        shape = MODEL_SHAPES[name]
        overrides = {k: v for k, v in task.get("model", {}).items() if k in TinyQwen2.__dataclass_fields__}
        if overrides:
            shape = TinyQwen2(**{**shape.__dict__, **overrides})
        kwargs = {"alphabet": MODEL_ALPHABETS[name]} if name in MODEL_ALPHABETS else {}
        build_model(out, shape=shape, seed=seed, **kwargs)

    return model_folder(_materialise(spec, MODEL_SHAPES, "model", run_dir, build))  # a .gguf: its HF folder


def materialise_data(spec: str, run_dir: Path, seed: int, task: dict) -> str:
    def build(name: str, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        DATA_BUILDERS[name](out, seed, task)

    return _materialise(spec, DATA_BUILDERS, "data", run_dir, build)
