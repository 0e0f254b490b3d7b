"""Both backends implement the whole Backend Protocol (redi/backend.py): every declared attribute exists, and
every declared method has a compatible signature (same parameter names and kinds, the declared defaults, any
extra parameter optional). The core calls nothing else: no hasattr/getattr/inspect probe on a backend."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from redi.backend import OPTION_KEYS, SPEED_KEYS, Backend, backend_options, make_backend
from redi.config import Config
from redi.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _declared_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(Backend).items()
            if inspect.isfunction(fn) and not name.startswith("_")}


def _declared_attributes() -> list[str]:
    return [name for name in Backend.__annotations__ if not name.startswith("_")]


def incompatibilities(obj) -> list[str]:
    """Every way ``obj`` falls short of the Protocol; empty when it satisfies it."""
    problems = [f"missing attribute {a}" for a in _declared_attributes() if a not in dir(obj)]
    for name, want in _declared_methods().items():
        member = inspect.getattr_static(obj, name, None)
        if member is None or not callable(getattr(obj, name)):
            problems.append(f"missing method {name}")
            continue
        have = inspect.signature(getattr(obj, name)).parameters
        wanted = [p for p in want.parameters.values() if p.name != "self"]
        for p in wanted:
            q = have.get(p.name)
            if q is None:
                problems.append(f"{name}: no parameter {p.name}")
            elif q.kind != p.kind:
                problems.append(f"{name}: {p.name} is {q.kind.description}, declared {p.kind.description}")
            elif p.default is not p.empty and q.default != p.default:
                problems.append(f"{name}: {p.name} defaults to {q.default!r}, declared {p.default!r}")
        names = {p.name for p in wanted}
        for q in have.values():
            if q.name not in names and q.default is q.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD):
                problems.append(f"{name}: extra required parameter {q.name}")
        if [p.name for p in wanted if p.kind == p.POSITIONAL_OR_KEYWORD] != \
                [q.name for q in have.values() if q.kind == q.POSITIONAL_OR_KEYWORD][:len(
                    [p for p in wanted if p.kind == p.POSITIONAL_OR_KEYWORD])]:
            problems.append(f"{name}: positional parameters in another order")
    return problems


def test_protocol_declares_what_the_core_calls():
    methods = set(_declared_methods())
    assert {"init_optimizer", "save_checkpoint", "load_checkpoint", "all_gather_object", "generate"} <= methods
    assert {"start_stage", "save_state", "load_state", "configure"}.isdisjoint(methods)
    assert {"name", "ops", "rank", "world_size"} <= set(_declared_attributes())
    assert "batch_size" in _declared_methods()["generate"].parameters
    save_model = _declared_methods()["save_model"].parameters["path"]
    assert "None" in str(save_model.annotation)


def test_the_checker_catches_a_backend_that_falls_short():
    class Old:  # the protocol as it was: generate without batch_size, no rank/world_size/all_gather_object
        name, ops = "old", None

        def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, eos_id):
            return []

        def load(self, model_path, precision="auto", lm_head_chunk=1024):  # precision not keyword-only
            pass

    problems = incompatibilities(Old())
    assert "missing attribute rank" in problems and "missing method all_gather_object" in problems
    assert "generate: no parameter batch_size" in problems
    assert any(p.startswith("load: precision is positional or keyword") for p in problems)


def test_torch_backend_satisfies_the_protocol():
    pytest.importorskip("torch")
    from redi.backends.torch_cuda.backend import TorchBackend

    backend = TorchBackend("cpu")
    assert incompatibilities(backend) == []
    assert (backend.rank, backend.world_size) == (0, 1)


def test_mlx_backend_satisfies_the_protocol():
    pytest.importorskip("mlx.core")
    import redi.backends.mlx  # noqa: F401 - preloads OpenBLAS (when installed) before mlx.core
    from redi.backends.mlx.backend import MLXBackend

    backend = MLXBackend()
    assert incompatibilities(backend) == []
    assert backend.all_gather_object({"a": 1}) == [{"a": 1}]


@pytest.mark.parametrize("name", ["cpu", "mlx"])
def test_config_options_reach_the_backend_through_its_constructor(name):
    pytest.importorskip("torch" if name == "cpu" else "mlx.core")
    cfg = Config(activation_checkpointing="1", optim_state_dtype="bf16", compile=True, packing=False)
    options = backend_options(cfg, name)
    assert set(options) == set(SPEED_KEYS) | {"lora"}  # the lora_* keys arrive as one LoraSpec
    assert all(hasattr(cfg, k) for k in OPTION_KEYS[name])
    assert options["lora"] is None
    backend = make_backend(name, 0, **options)
    assert (backend.options.activation_checkpointing, backend.options.optim_state_dtype) == ("1", "bf16")
    assert backend.options.compile in (True, "true") and backend.options.packing in (False, "false")


@pytest.mark.parametrize("name", ["cpu", "mlx"])
def test_lora_keys_reach_the_backend_as_one_spec(name):
    pytest.importorskip("peft" if name == "cpu" else "mlx.core")
    backend = make_backend(name, 0, **backend_options(Config(lora_rank=8, lora_scale=4.0, lora_dora=True), name))
    assert (backend.lora.rank, backend.lora.scale, backend.lora.dora) == (8, 4.0, True)


def test_an_unknown_option_is_one_user_error():
    pytest.importorskip("torch")
    with pytest.raises(UserError, match="unknown torch backend option 'pakcing'"):
        make_backend("cpu", 0, pakcing=False)


def test_no_probe_on_a_backend_in_the_core():
    probe = re.compile(r"\b(hasattr|getattr)\(\s*backend\b|inspect\.\w+\(\s*backend\b")
    hits = [f"{path.relative_to(ROOT)}:{i}" for path in (ROOT / "redi").rglob("*.py")
            for i, line in enumerate(path.read_text().splitlines(), 1) if probe.search(line)]
    assert hits == []


@pytest.mark.parametrize(("value", "packed"), [("auto", False), ("true", True), (False, False), ("false", False)])
def test_packing_auto_pads_on_the_cpu(value, packed):
    """auto: the CPU runs padded batches (its per-document attention measured slower; docs/speed.md)."""
    pytest.importorskip("torch")
    backend = make_backend("cpu", 0, **backend_options(Config(packing=value), "cpu"))
    assert backend.options.packing is packed and backend.pads_micro_batches is not packed


def test_packing_refuses_other_values():
    from redi.errors import UserError
    from redi.option_checks import packing_mode

    with pytest.raises(UserError, match="'packing' must be true, false or auto"):
        packing_mode("yes")
