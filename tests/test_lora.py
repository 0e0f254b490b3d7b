"""LoRA / DoRA (issue 17): the torch backend (PEFT) and the MLX backend (mlx-lm's tuner) train the same
adapters. Same seeded initial weights -> the same first 5 step losses (SFT and REDI) and the same merged
final model; each backend's adapter folder loads in the other library (PEFT <-> mlx-lm) with its origin's
logits; checkpoints hold the adapter + optimizer state only; AdamW state exists for the adapters alone.

The tiny non-trivial model of conftest.py; every reference is a different library than the one that wrote
the file (transformers for merged models, PEFT and mlx-lm for adapters).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from redi.backends.torch_cuda.backend import TorchBackend  # noqa: E402
from redi.config import apply_overrides, load_config, validate  # noqa: E402
from redi.lora import (LoraSpec, initial_a, mlx_to_peft, peft_to_mlx, spec_from_config)  # noqa: E402
from redi.training.api import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SPECS = {"lora": LoraSpec(rank=4, scale=8.0), "dora": LoraSpec(rank=4, scale=8.0, dora=True)}
IDS = np.arange(3, 40)[None]


def _mlx_available() -> bool:
    try:
        import redi.backends.mlx  # noqa: F401 - preloads OpenBLAS before mlx.core
        from redi.backends.mlx.backend import MLXBackend  # noqa: F401
        return True
    except Exception:
        return False


needs_mlx = pytest.mark.skipif(not _mlx_available(), reason="needs mlx (mlx[cpu] on Linux)")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~25k-parameter models: one thread, no OpenMP spin on a busy 2-core box
    yield
    torch.set_num_threads(threads)


def _cfg(out: Path, model: str, stage: str, backend: str, kind: str, *overrides: str):
    cfg = load_config(TINY)
    cfg.output, cfg.model, cfg.stage = str(out), model, stage
    dora = "true" if kind == "dora" else "false"
    return apply_overrides(cfg, [f"backend={backend}", "lora_rank=4", "lora_scale=8.0", f"lora_dora={dora}",
                                 "save_every=2", "sft.batch_size=8", "sft.micro_batch_size=4", "sft.max_steps=5",
                                 "sft.warmup_ratio=0", "pairs.batch_size=8", "pairs.micro_batch_size=4",
                                 "pairs.max_steps=5", "pairs.warmup_ratio=0", "pairs.learning_rate=3e-3", *overrides])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _hf_logits(path: Path, ids: np.ndarray = IDS) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.numpy()


def _train(out: Path, model: str, stage: str, name: str, kind: str):
    from redi.backend import make_backend

    cfg = _cfg(out, model, stage, "cpu" if name == "torch" else "mlx", kind)
    backend = make_backend(cfg.backend, cfg.seed, lora=spec_from_config(cfg))
    train(cfg, backend=backend)
    return backend


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("lora-torch")
    return {(stage, kind): (root / f"{stage}-{kind}", _train(root / f"{stage}-{kind}", tiny_model_dir, stage, "torch", kind))
            for stage in ("sft", "pairs") for kind in ("lora", "dora")}


@pytest.fixture(scope="module")
def mlx_runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("lora-mlx")
    return {(stage, kind): (root / f"{stage}-{kind}", _train(root / f"{stage}-{kind}", tiny_model_dir, stage, "mlx", kind))
            for stage in ("sft", "pairs") for kind in ("lora", "dora")}


# ------------------------------------------------------------------------------------------ core rules


def test_initial_a_is_seeded_per_module_with_the_kaiming_uniform_bound():
    a = initial_a(0, "model.layers.0.self_attn.q_proj", 64, 8)
    assert a.shape == (8, 64) and a.dtype == np.float32
    assert np.array_equal(a, initial_a(0, "model.layers.0.self_attn.q_proj", 64, 8))
    assert not np.array_equal(a, initial_a(1, "model.layers.0.self_attn.q_proj", 64, 8))
    assert not np.array_equal(a, initial_a(0, "model.layers.0.self_attn.k_proj", 64, 8))
    # PEFT's kaiming_uniform_(a=sqrt(5)) and mlx-lm's uniform both have bound 1/sqrt(in) = 0.125 here
    assert 0.11 < np.abs(a).max() <= 0.125


def test_key_conversion_round_trips_and_transposes():
    rng = np.random.default_rng(0)
    peft = {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": rng.normal(size=(4, 32)).astype(np.float32),
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": rng.normal(size=(64, 4)).astype(np.float32),
            "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector": rng.normal(size=64).astype(np.float32)}
    mlx = peft_to_mlx(peft)
    assert mlx["model.layers.0.mlp.up_proj.lora_a"].shape == (32, 4)
    assert mlx["model.layers.0.mlp.up_proj.lora_b"].shape == (4, 64)
    assert np.array_equal(mlx["model.layers.0.mlp.up_proj.m"], peft["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"])
    back = mlx_to_peft(mlx)
    assert set(back) == set(peft) and all(np.array_equal(back[k], peft[k]) for k in peft)


def test_config_keys_are_checked():
    cfg = load_config(TINY)
    assert spec_from_config(cfg) is None
    cfg = apply_overrides(cfg, ["lora_rank=8", "lora_targets=q_proj, v_proj", "backend=cpu"])
    spec = spec_from_config(validate(cfg))
    assert spec.targets == ("q_proj", "v_proj") and spec.alpha == 8 * 20.0
    from redi.errors import UserError

    with pytest.raises(UserError, match="'lora_dora' needs lora_rank"):
        validate(apply_overrides(load_config(TINY), ["lora_dora=true"]))
    with pytest.raises(UserError, match="lora_dropout"):
        validate(apply_overrides(load_config(TINY), ["lora_rank=4", "lora_dropout=1.5"]))


# ------------------------------------------------------------------------------------------ torch side


def test_peft_wraps_the_targets_and_only_adapters_train(tiny_model_dir):
    b = TorchBackend("cpu", seed=3, lora=LoraSpec(rank=4, scale=8.0, targets=("q_proj", "down_proj")))
    b.load(tiny_model_dir)
    trainable = {n: p for n, p in b.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "down_proj"}
    # B = 0 (the model starts as the base model), A = the shared seeded draw
    q = b.model.model.layers[1].self_attn.q_proj
    assert not q.lora_B["default"].weight.any()
    assert np.array_equal(q.lora_A["default"].weight.detach().numpy(), initial_a(3, "model.layers.1.self_attn.q_proj", 32, 4))
    b.init_optimizer(weight_decay=0.0)
    params = [p for g in b.optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in params) == b.num_trainable_parameters() == 2 * 4 * (32 + 32 + 64 + 32)  # layers * r * (in + out)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_torch_checkpoint_holds_adapter_and_optimizer_only(torch_runs, kind):
    run, backend = torch_runs["sft", kind]
    step = run / "checkpoints" / "step-4"
    assert {p.name for p in step.iterdir()} == {"adapter_model.safetensors", "adapters.safetensors",
                                               "adapter_config.json", "optimizer.pt", "trainer_state.json"}
    state = torch.load(step / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert sum(s["exp_avg"].numel() for s in state.values()) == backend.num_trainable_parameters()
    assert (run / "final" / "model.safetensors").exists() and (run / "final" / "adapter" / "adapter_config.json").exists()
    losses = [r["loss"] for r in _metrics(run)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_torch_merged_final_equals_the_live_adapted_model(torch_runs, kind):
    run, backend = torch_runs["pairs", kind]
    with torch.no_grad():
        live = backend.model(input_ids=torch.from_numpy(IDS).long()).logits.numpy()
    np.testing.assert_allclose(_hf_logits(run / "final"), live, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_torch_adapter_loads_in_peft(torch_runs, tiny_model_dir, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = torch_runs["pairs", kind]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run / "final" / "adapter"))
    with torch.no_grad():
        got = model(input_ids=torch.from_numpy(IDS).long()).logits.numpy()
    np.testing.assert_allclose(got, _hf_logits(run / "final"), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ torch vs MLX


@needs_mlx
@pytest.mark.parametrize("stage", ["sft", "pairs"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_five_steps_match_mlx(torch_runs, mlx_runs, stage, kind):
    want, got = _metrics(torch_runs[stage, kind][0]), _metrics(mlx_runs[stage, kind][0])
    assert len(want) == len(got) == 5
    for a, b in zip(want, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert want[-1]["loss"] != pytest.approx(want[0]["loss"], abs=1e-3)  # the adapters did move the model


@needs_mlx
@pytest.mark.parametrize("stage", ["sft", "pairs"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_final_models_match_mlx(torch_runs, mlx_runs, stage, kind):
    np.testing.assert_allclose(_hf_logits(mlx_runs[stage, kind][0] / "final"),
                               _hf_logits(torch_runs[stage, kind][0] / "final"), atol=1e-4, rtol=0)


@needs_mlx
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_run_folders_have_the_same_files(torch_runs, mlx_runs, kind):
    def files(run):
        return {str(p.relative_to(run)).replace("optimizer.safetensors", "optimizer.pt") for p in run.rglob("*")
                if p.is_file()}

    assert files(mlx_runs["pairs", kind][0]) == files(torch_runs["pairs", kind][0])


@needs_mlx
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_adapter_loads_in_peft_with_mlx_logits(mlx_runs, tiny_model_dir, kind):
    import mlx.core as mx
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, backend = mlx_runs["pairs", kind]
    want = np.array(backend.model(mx.array(IDS)))  # the MLX run's live adapted model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run / "final" / "adapter"))
    with torch.no_grad():
        got = model(input_ids=torch.from_numpy(IDS).long()).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@needs_mlx
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_torch_adapter_loads_in_mlx_lm_with_torch_logits(torch_runs, tiny_model_dir, kind):
    import mlx.core as mx
    import mlx_lm

    run, backend = torch_runs["pairs", kind]
    with torch.no_grad():
        want = backend.model(input_ids=torch.from_numpy(IDS).long()).logits.numpy()  # the torch run's live model
    model, _ = mlx_lm.load(tiny_model_dir, adapter_path=str(run / "final" / "adapter"))
    got = np.array(model(mx.array(IDS)).astype(mx.float32))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_bf16_frozen_base_gives_the_autocast_products_bit_for_bit(tmp_path):
    """The CUDA memory saving (frozen block linears stored in bf16 under bf16 autocast), checked with the CPU's
    bf16 autocast on a model whose weights are bf16-representable, as released checkpoints are."""
    from transformers import AutoModelForCausalLM

    from redi.backends.torch_cuda import lora as torch_lora
    from redi.tiny import TinyQwen2, build_model

    path = build_model(tmp_path / "m", shape=TinyQwen2(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2), seed=5)
    spec, ids = LoraSpec(rank=4, scale=8.0), torch.from_numpy(IDS).long()
    models = []
    for frozen in (None, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).float()  # bf16-representable
        torch_lora.wrap(model, spec, seed=0, frozen_dtype=frozen)
        with torch.no_grad():
            for _, layer in torch_lora.lora_layers(model):
                layer.lora_B["default"].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        models.append(model)
    kinds = {n: p.dtype for n, p in models[1].named_parameters()}
    assert kinds["model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert kinds["model.layers.0.self_attn.q_proj.lora_A.default.weight"] == torch.float32
    assert kinds["model.embed_tokens.weight"] == kinds["model.norm.weight"] == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = (m(input_ids=ids).logits.float() for m in models)
    assert torch.equal(got, want)


def test_lora_lowers_the_training_loss_on_the_demo_task(tmp_path):
    """A sanity check, not an accuracy claim: rank-16 adapters on the built-in demo's model and SFT data."""
    cfg = apply_overrides(load_config(ROOT / "configs" / "demo.yaml"),
                          [f"output={tmp_path / 'demo'}", "backend=cpu", "stage=sft", "sft.max_steps=12",
                           "lora_rank=16", "lora_scale=2.0"])
    train(cfg)
    losses = [r["loss"] for r in _metrics(tmp_path / "demo")]
    assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0] - 0.2, losses  # 3.31 -> ~2.85 measured


def _pair_batch(model_dir: str):
    from transformers import AutoTokenizer

    from redi.backend import MicroBatch
    from redi.data import Encoder

    enc = Encoder(AutoTokenizer.from_pretrained(model_dir))
    seqs = []
    for completion in ("12+345=357 \\boxed{357}", "12+345=367"):
        p, c = enc.texts([{"role": "user", "content": "12+345=?"}], [{"role": "assistant", "content": completion}])
        ids = enc.encode_many([p, c])
        seqs.append(enc.finish(ids[0], ids[1], 0))
    return MicroBatch(seqs, 1, 1.0, np.arange(1))


@pytest.mark.parametrize("name", ["torch", pytest.param("mlx", marks=needs_mlx)])
def test_lora_dropout_acts_in_training_passes_only(tiny_model_dir, name):
    from redi.backend import make_backend
    from redi.objectives import make_objective
    from redi.training.loop import StageRun, micro_batch_loss

    def backend(dropout):
        b = make_backend("cpu" if name == "torch" else "mlx", 0, lora=LoraSpec(rank=4, scale=8.0, dropout=dropout))
        b.load(tiny_model_dir)
        b.init_optimizer(weight_decay=0.0)
        return b

    batch, run = _pair_batch(tiny_model_dir), StageRun("pairs", None, [], make_objective("redi"), 0)
    for dropout in (0.0, 0.5):
        b = backend(dropout)
        b.forward_backward(batch, micro_batch_loss(run, batch))
        b.optimizer_step(1e-2, 1.0)  # B != 0 from here on, so dropping adapter inputs changes S
        reference = b.sequence_logps(batch)[0]
        assert np.array_equal(b.sequence_logps(batch)[0], reference)  # no random mask outside training
        s = b.forward_backward(batch, micro_batch_loss(run, batch))[0]
        if dropout:
            assert not np.allclose(s, reference, rtol=1e-4)  # the training pass did drop adapter inputs
        else:
            np.testing.assert_allclose(s, reference, rtol=1e-6)


def test_disk_room_counts_adapter_checkpoints(tmp_path):
    """A checkpoint holds the adapter and its moments, not the model: a run that full fine-tuning could not
    fit on this disk fits with LoRA."""
    import shutil

    from redi.errors import UserError
    from redi.training.run_folder import check_disk_room

    n = shutil.disk_usage(tmp_path).free // 20  # full: 2 x 4n final models + 3 x 12n checkpoints = 2.2x free
    with pytest.raises(UserError, match="not enough disk space"):
        check_disk_room(tmp_path, n, keep_last=2, with_checkpoints=True)
    check_disk_room(tmp_path, n, keep_last=2, with_checkpoints=True, trainable=n // 1000)  # ~0.4x free


def test_targets_that_match_nothing_are_refused(tiny_model_dir):
    from redi.errors import UserError

    with pytest.raises(UserError, match="lora_targets qproj match no linear layer"):
        TorchBackend("cpu", lora=LoraSpec(rank=4, targets=("qproj",))).load(tiny_model_dir)
