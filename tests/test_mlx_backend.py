"""The MLX backend gives the torch backend's numbers (issue 6): S and L, every objective's loss and
gradients, five optimizer steps of SFT and REDI, checkpoints both ways, resume, generation, LoRA.

All on the tiny non-trivial model of conftest.py (rope_theta 1000, noisy norms, init_std 0.2), so a wrong
RoPE base or mask shows up as a large difference. Runs on Linux through mlx[cpu].
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import redi.backends.mlx  # noqa: F401 - preloads OpenBLAS (when installed) before mlx.core

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from mlx.utils import tree_flatten  # noqa: E402

from redi.training.api import train  # noqa: E402
from redi.backends.mlx.backend import MLXBackend  # noqa: E402
from redi.backends.torch_cuda.backend import TorchBackend  # noqa: E402
from redi.backend import MicroBatch  # noqa: E402
from redi.config import apply_overrides, load_config  # noqa: E402
from redi.data import Encoder  # noqa: E402
from redi.training.loop import StageRun, micro_batch_loss  # noqa: E402
from redi.objectives import make_objective  # noqa: E402
from redi.tiny import TinyQwen2, build_model  # noqa: E402

pytestmark = pytest.mark.mlx
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"



@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # The torch side here is a reference on ~25k-parameter models: one thread is as fast as two on an idle
    # box and up to 75x faster on a busy 2-core one (OpenMP spin-waiting).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (prompt, chosen, rejected): chat-templated, masked prompts of different lengths, so rows are padded.
ROWS = [
    ("12+345=?", "12+345=357\n\\boxed{357}", "12+345=367\n\\boxed{367}"),
    ("9+9=?", "I think 18, so \\boxed{18}", "19"),
    ("a long prompt with words and 123 digits, then more words?", "ok \\boxed{1}", "not ok at all \\boxed{2}"),
]


def _encode(tokenizer, prompt: str, completion: str):
    enc = Encoder(tokenizer)
    p_text, c_text = enc.texts([{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}])
    ids = enc.encode_many([p_text, c_text])
    return enc.finish(ids[0], ids[1], 0)


@pytest.fixture(scope="module")
def pair_batch(tiny_tokenizer) -> MicroBatch:
    chosen = [_encode(tiny_tokenizer, p, c) for p, c, _ in ROWS]
    rejected = [_encode(tiny_tokenizer, p, r) for p, _, r in ROWS]
    return MicroBatch(chosen + rejected, len(ROWS), 1.0, np.arange(len(ROWS)))


@pytest.fixture(scope="module")
def backends(tiny_model_dir):
    t = TorchBackend("cpu")
    t.load(tiny_model_dir)
    m = MLXBackend()
    m.load(tiny_model_dir)
    return t, m


def _close_s(got, want):
    # fp32 sums of ~150 nats carry ~1e-5 of rounding in either backend (one ulp at 128-256 is 1.5e-5), so
    # the bound is 1e-5 plus 1e-6 relative: still 1,000x below what a wrong RoPE base does (test below).
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_logps_match_torch(tiny_model_dir, pair_batch, backends, chunk):
    t, _ = backends
    m = MLXBackend()
    m.load(tiny_model_dir, lm_head_chunk=chunk)
    want_s, want_l = t.sequence_logps(pair_batch)
    got_s, got_l = m.sequence_logps(pair_batch)
    np.testing.assert_array_equal(got_l, want_l)
    _close_s(got_s, want_s)
    assert np.ptp(want_s / want_l) > 0.05  # far from uniform: errors cannot hide


def test_logps_match_torch_tied_embeddings(tmp_path, pair_batch):
    shape = TinyQwen2(init_std=0.2, norm_noise=0.3, rope_theta=1000.0, tie_word_embeddings=True)
    path = str(build_model(tmp_path / "tied", shape=shape, seed=5))
    t, m = TorchBackend("cpu"), MLXBackend()
    t.load(path)
    m.load(path)
    assert m.num_parameters() == t.num_parameters()
    _close_s(m.sequence_logps(pair_batch)[0], t.sequence_logps(pair_batch)[0])


def test_rope_theta_only_in_rope_parameters_is_honoured(tmp_path, tiny_model_dir, pair_batch, backends):
    """transformers 5 writes rope_theta only inside rope_parameters; plain mlx-lm then uses 1e6."""
    from mlx_lm.utils import load_model

    trap = tmp_path / "no-top-level-rope"
    shutil.copytree(tiny_model_dir, trap)
    cfg = json.loads((trap / "config.json").read_text())
    cfg.pop("rope_theta", None)
    (trap / "config.json").write_text(json.dumps(cfg))
    want = backends[0].sequence_logps(pair_batch)[0]
    m = MLXBackend()
    m.load(str(trap))
    _close_s(m.sequence_logps(pair_batch)[0], want)
    # The same directory through mlx-lm alone: the wrong base moves S by far more than the tolerance.
    m.model, _ = load_model(trap)
    m.model.set_dtype(mx.float32)
    assert np.abs(m.sequence_logps(pair_batch)[0] - want).max() > 1e-2


# --------------------------------------------------------------------------------- objectives and gradients


def _grads_torch(t: TorchBackend) -> dict[str, np.ndarray]:
    return {n: p.grad.numpy().copy() for n, p in t.model.named_parameters() if p.grad is not None}


# REDI with the authors' negative weighting (gradient through the weight) and its detached variant.
VARIANTS = {"redi-negw": ("redi", {"neg_weighting_gamma": 1.0, "chosen_coef": 0.7}),
            "redi-negw-detached": ("redi", {"neg_weighting_detached_gamma": 2.0})}


@pytest.mark.parametrize("objective", ["redi", "symmetric", "dpo", "simpo", "orpo", "sft", *VARIANTS])
def test_objective_loss_and_gradients_match_torch(backends, pair_batch, objective):
    t, m = backends
    if objective == "sft":
        batch = MicroBatch(pair_batch.seqs[:3], 0, 0.5, np.arange(3))
        run = StageRun("sft", None, [], None, 0)
    else:
        batch = MicroBatch(pair_batch.seqs, 3, 0.5, np.arange(3))
        batch.ref_logps = t.sequence_logps(batch)[0] + np.array([-3.0, 1.0, 2.0, 0.5, -1.0, 4.0])
        name, params = VARIANTS.get(objective, (objective, {}))
        run = StageRun("pairs", None, [], make_objective(name, **params), 0)
    loss_fn = micro_batch_loss(run, batch)
    t.init_optimizer(weight_decay=0.0)
    m.init_optimizer(weight_decay=0.0)
    s_t, l_t = t.forward_backward(batch, loss_fn)
    s_m, l_m = m.forward_backward(batch, loss_fn)
    loss_t = float(loss_fn(t.ops, t.ops.asarray(s_t), t.ops.asarray(l_t.astype(float))))
    loss_m = float(loss_fn(m.ops, m.ops.asarray(s_m), m.ops.asarray(l_m.astype(float))))
    assert abs(loss_m - loss_t) <= 1e-5, (loss_m, loss_t)
    assert abs(loss_t) > 1e-3
    g_t = _grads_torch(t)
    g_m = {k: np.array(v) for k, v in m._grads.items()}
    assert set(g_m) == set(g_t)
    scale = max(np.abs(g).max() for g in g_t.values())
    for k in g_t:
        np.testing.assert_allclose(g_m[k], g_t[k], atol=1e-5 * max(1.0, scale), rtol=1e-4, err_msg=k)
    # Both clip the same way and report the same pre-clip norm.
    assert m.optimizer_step(1e-3, 0.5)["grad_norm"] == pytest.approx(t.optimizer_step(1e-3, 0.5)["grad_norm"], rel=1e-5)
    t.load(t.model_path)
    m.load(str(m.source))


@pytest.mark.parametrize("params", VARIANTS.values(), ids=list(VARIANTS))
def test_neg_weighting_loss_and_gradient_match_torch_to_1e6(params):
    """The objective alone, on the same float32 S and L: MLX's loss and dloss/dS equal torch's to 1e-6."""
    from redi.backends.mlx.backend import MLXOps
    from redi.backends.torch_cuda.backend import TorchOps
    from redi.objectives import PairStats

    objective = make_objective(params[0], **params[1])
    s = np.array([-2.0, -6.5, -0.3, -4.0, -3.0, -9.0], dtype=np.float32)  # chosen x3, then rejected x3
    lengths = np.array([2.0, 3.0, 1.0, 4.0, 1.0, 5.0], dtype=np.float32)
    s_t = torch.tensor(s, requires_grad=True)
    loss_t = objective(TorchOps(torch.device("cpu")), PairStats.from_halves(s_t, torch.tensor(lengths)))[0]
    loss_t.backward()

    def mlx_loss(x):
        return objective(MLXOps(), PairStats.from_halves(x, mx.array(lengths)))[0]

    loss_m, grad_m = mx.value_and_grad(mlx_loss)(mx.array(s))
    assert abs(loss_m.item() - loss_t.item()) <= 1e-6
    np.testing.assert_allclose(np.array(grad_m), s_t.grad.numpy(), atol=1e-6, rtol=0)
    assert np.abs(s_t.grad.numpy()).max() > 1e-2


def test_checkpointing_and_compile_change_nothing(tiny_model_dir, pair_batch, monkeypatch):
    """Gradient checkpointing, mx.compile and recomputed LM-head chunks (long rows: KEEP_LOGITS_BYTES exceeded)
    give the plain path's S and gradients bit for bit."""
    from redi.backends.mlx import logprobs

    loss_fn = micro_batch_loss(StageRun("pairs", None, [], make_objective("redi"), 0), pair_batch)
    results = []
    for kwargs in ({}, {"activation_checkpointing": "full"}, {"compile": True}, {"activation_checkpointing": "1"},
                   {"activation_checkpointing": "full", "compile": True}, {"recompute_head": True}):
        if kwargs.pop("recompute_head", False):
            monkeypatch.setattr(logprobs, "KEEP_LOGITS_BYTES", 0)
        m = MLXBackend(**kwargs)
        m.load(tiny_model_dir, lm_head_chunk=4)
        m.init_optimizer(weight_decay=0.0)
        for _ in range(2):  # the second call reuses the compiled graph
            s, _ = m.forward_backward(pair_batch, loss_fn)
        results.append((s, {k: np.array(v) for k, v in m._grads.items()}))
    for s, grads in results[1:]:
        np.testing.assert_allclose(s, results[0][0], atol=1e-6, rtol=0)
        for k, g in grads.items():
            np.testing.assert_allclose(g, results[0][1][k], atol=1e-6, rtol=0)


def test_checkpointing_patches_no_class(tiny_model_dir):
    from mlx_lm.models.qwen2 import TransformerBlock

    call = TransformerBlock.__call__
    m = MLXBackend(activation_checkpointing="full")
    m.load(tiny_model_dir)
    assert type(m.model.layers[0]) is not TransformerBlock and isinstance(m.model.layers[0], TransformerBlock)
    assert TransformerBlock.__call__ is call
    other = MLXBackend(activation_checkpointing="none")
    other.load(tiny_model_dir)
    assert type(other.model.layers[0]) is TransformerBlock


def test_auto_checkpointing_plan():
    from redi.backends.mlx import checkpointing
    from redi.backends.mlx.memory import GB

    qwen_1p5b = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                 "num_key_value_heads": 2, "vocab_size": 151936}
    kw = dict(tokens=2 * 4096, width=4096, seqs=2, static_bytes=24.7 * GB, compute_bytes=2, lm_head_chunk=1024)
    plans = [checkpointing.plan("auto", qwen_1p5b, budget_bytes=b * GB, **kw) for b in (200, 60, 40, 20)]
    assert plans[0] == 0 and plans[-1] == 28 and plans == sorted(plans) and 0 < plans[1] < 28
    assert checkpointing.plan("auto", qwen_1p5b, **kw) == 0  # a CPU never plans, like the torch backend
    assert checkpointing.plan("7", qwen_1p5b, **kw) == 7 and checkpointing.plan("full", qwen_1p5b, **kw) == 28
    with pytest.raises(Exception, match="activation_checkpointing"):
        MLXBackend(activation_checkpointing="sometimes")


def test_bf16_optimizer_state_matches_torch(tiny_model_dir, pair_batch):
    t, m = TorchBackend("cpu", optim_state_dtype="bf16"), MLXBackend(optim_state_dtype="bf16")
    losses = []
    for b in (t, m):
        b.load(tiny_model_dir)
        b.init_optimizer(weight_decay=0.1)
        for _ in range(3):
            b.forward_backward(pair_batch, lambda ops, s, n: -ops.mean(s / n))
            b.optimizer_step(1e-3, 1.0)
        losses.append(b.sequence_logps(pair_batch)[0])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert m.optimizer.m["model.norm.weight"].dtype == mx.bfloat16


def test_bf16_compute_keeps_fp32_masters(tiny_model_dir, pair_batch, backends):
    m = MLXBackend()
    m.load(tiny_model_dir, precision="bf16")
    m.init_optimizer(weight_decay=0.0)
    s, _ = m.forward_backward(pair_batch, lambda ops, s, n: -ops.sum(s / n))
    np.testing.assert_allclose(s, backends[0].sequence_logps(pair_batch)[0], rtol=2e-2)
    m.optimizer_step(1e-3, 1.0)
    assert {v.dtype for _, v in tree_flatten(m.model.parameters())} == {mx.float32}


def test_nonfinite_gradient_skips_the_step(tiny_model_dir, pair_batch):
    m = MLXBackend()
    m.load(tiny_model_dir)
    m.init_optimizer(weight_decay=0.1)
    before = {k: np.array(v) for k, v in tree_flatten(m.model.parameters())}
    m.forward_backward(pair_batch, lambda ops, s, n: ops.sum(s) * float("nan"))
    update = m.optimizer_step(1e-3, 1.0)
    assert update["skipped"] == 1.0 and not np.isfinite(update["grad_norm"])
    assert all(np.array_equal(before[k], np.array(v)) for k, v in tree_flatten(m.model.parameters()))
    m.forward_backward(pair_batch, lambda ops, s, n: -ops.sum(s / n))  # the bad gradient is gone
    assert np.isfinite(m.optimizer_step(1e-3, 1.0)["update_norm"])


# -------------------------------------------------------------------------------- training through the core


def _cfg(out: Path, model: str, stage: str, *overrides: str, objective: str = "redi"):
    cfg = load_config(TINY)
    cfg.output, cfg.model, cfg.stage, cfg.objective = str(out), model, stage, objective
    # warmup 0: every one of the 5 steps moves the weights; lr as in tiny.yaml (large, so errors compound).
    return apply_overrides(cfg, ["sft.batch_size=8", "sft.micro_batch_size=4", "sft.max_steps=5", "sft.warmup_ratio=0",
                                 "pairs.batch_size=8", "pairs.micro_batch_size=4", "pairs.max_steps=5",
                                 "pairs.warmup_ratio=0", *overrides])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """SFT and REDI, 5 steps each, through redi.training.api.train on both backends (MLX REDI with full activation
    checkpointing and mx.compile, so both options are held to the same parity)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for stage in ("sft", "pairs"):
        for name in ("torch", "mlx"):
            options = ["activation_checkpointing=full", "compile=true"] if (name, stage) == ("mlx", "pairs") else []
            # Options reach a backend through its constructor only (make_backend does this from the config).
            backend = TorchBackend("cpu", seed=0) if name == "torch" else MLXBackend(
                seed=0, **({"activation_checkpointing": "full", "compile": True} if options else {}))
            cfg = _cfg(root / f"{name}-{stage}", tiny_model_dir, stage, f"backend={'cpu' if name == 'torch' else 'mlx'}",
                       "save_every=2", *options)
            train(cfg, backend=backend)
            if options:
                assert backend.options.compile and backend.checkpointed_layers == len(backend.model.layers)
            out[name, stage] = Path(cfg.output)
    return out


@pytest.mark.parametrize("stage", ["sft", "pairs"])
def test_five_steps_match_torch(runs, stage):
    want, got = _metrics(runs["torch", stage]), _metrics(runs["mlx", stage])
    assert len(want) == len(got) == 5
    for a, b in zip(want, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["update_norm"] == pytest.approx(a["update_norm"], rel=1e-3)
        assert set(a) == set(b)
    assert want[-1]["loss"] != pytest.approx(want[0]["loss"], abs=1e-3)  # the steps did move the model


@pytest.mark.parametrize("stage", ["sft", "pairs"])
def test_run_folder_has_the_torch_files(runs, stage):
    assert _files(runs["mlx", stage]) == _files(runs["torch", stage]) - {"checkpoints/step-2/optimizer.pt",
                                                                         "checkpoints/step-4/optimizer.pt"} | {
        "checkpoints/step-2/optimizer.safetensors", "checkpoints/step-4/optimizer.safetensors"}
    summary = json.loads((runs["mlx", stage] / "summary.json").read_text())
    assert summary["backend"] == "mlx" and summary["steps"] == 5


def _hf_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.numpy()


def test_torch_checkpoint_loads_in_mlx_lm(runs):
    import mlx_lm

    final = runs["torch", "pairs"] / "final"
    model, tokenizer = mlx_lm.load(str(final))
    ids = np.array([tokenizer.encode("12+345=357\n\\boxed{357}")])
    got = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(got, _hf_logits(final, ids), atol=1e-4, rtol=1e-4)


def test_mlx_checkpoint_loads_in_transformers(runs):
    final = runs["mlx", "pairs"] / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["rope_theta"] == 1000.0 and cfg["dtype"] == "float32"
    m = MLXBackend()
    m.load(str(final))
    ids = np.arange(3, 40)[None]
    np.testing.assert_allclose(np.array(m.model(mx.array(ids))), _hf_logits(final, ids), atol=1e-4, rtol=1e-4)
    # and it is the model the torch run trained, up to the parity tolerance
    np.testing.assert_allclose(_hf_logits(final, ids), _hf_logits(runs["torch", "pairs"] / "final", ids), atol=2e-3)


def test_resume_continues_exactly(runs, tmp_path, tiny_model_dir):
    """Delete the end of an MLX run, resume from checkpoints/step-4: step 5 is the uninterrupted step 5."""
    src = runs["mlx", "sft"]
    run = tmp_path / "resumed"
    shutil.copytree(src, run)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    cfg = _cfg(run, tiny_model_dir, "sft", "backend=mlx", "save_every=2")
    train(cfg, resume=True, backend=MLXBackend(seed=0))
    a, b = _metrics(src)[-1], _metrics(run)[-1]
    assert b["global_step"] == 5
    for key in ("loss", "grad_norm", "update_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key


# ------------------------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("stage,objective", [("sft", "redi"), ("pairs", "redi"), ("pairs", "dpo"), ("pairs", "simpo")])
def test_cli_writes_the_torch_run_folder(tmp_path, stage, objective):
    """`redi train --backend mlx` on the tiny recipe: the torch backend's files, metric keys and losses."""
    from redi.cli.main import main

    common = ["train", "--config", str(TINY), "--max-steps", "5", "--stage", stage, "--objective", objective,
              "--set", "sft.batch_size=8", "--set", "sft.micro_batch_size=4",
              "--set", "pairs.batch_size=8", "--set", "pairs.micro_batch_size=4"]
    for backend in ("cpu", "mlx"):
        assert main([*common, "--backend", backend, "--output", str(tmp_path / backend)]) == 0
    assert _files(tmp_path / "mlx") == _files(tmp_path / "cpu")
    want, got = _metrics(tmp_path / "cpu"), _metrics(tmp_path / "mlx")
    assert [set(r) for r in got] == [set(r) for r in want]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(want, got)) <= 1e-4


# ---------------------------------------------------------------------------------------------- generation


def test_greedy_generation_matches_torch(backends):
    t, m = backends
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    eos = t.model.config.eos_token_id
    want = t.generate(prompts, max_new_tokens=12, temperature=0.0, top_p=1.0, seed=0, eos_id=eos)
    got = m.generate(prompts, max_new_tokens=12, temperature=0.0, top_p=1.0, seed=0, eos_id=eos)
    assert got == want
    # left padding changes nothing: one prompt at a time gives the same tokens
    assert [m.generate([p], max_new_tokens=12, temperature=0.0, top_p=1.0, seed=0, eos_id=eos)[0] for p in prompts] == got


def test_sampling_is_seeded(backends):
    m = backends[1]
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, eos_id=-1)
    a = m.generate([[5, 6, 7]] * 4, seed=1, **kw)
    assert a == m.generate([[5, 6, 7]] * 4, seed=1, **kw)
    assert a != m.generate([[5, 6, 7]] * 4, seed=2, **kw)
    assert all(len(r) == 10 for r in a)


# -------------------------------------------------------------------------------------------- LoRA / DoRA


@pytest.mark.parametrize("dora", [False, True])
def test_lora_trains_saves_fused_and_resumes(tmp_path, tiny_model_dir, dora):
    def backend():
        from redi.lora import LoraSpec

        return MLXBackend(seed=0, lora=LoraSpec(rank=4, scale=8.0, dora=dora))

    cfg = _cfg(tmp_path / "lora", tiny_model_dir, "sft", "backend=mlx", "save_every=2", "sft.max_steps=6")
    first = backend()
    train(cfg, backend=first)
    trainable = dict(tree_flatten(first.model.trainable_parameters()))
    assert trainable and all(("lora_" in k) or k.endswith(".m") for k in trainable)
    losses = [r["loss"] for r in _metrics(Path(cfg.output))]
    assert losses[-1] < losses[0]
    # final/ is a plain HF model with the adapters fused in: transformers gives the adapted model's logits.
    ids = np.arange(3, 30)[None]
    np.testing.assert_allclose(_hf_logits(Path(cfg.output) / "final", ids), np.array(first.model(mx.array(ids))),
                               atol=1e-4, rtol=1e-4)
    # resume from step-4 (base model + adapters + optimizer state) reproduces steps 5 and 6
    run = tmp_path / "lora-resumed"
    shutil.copytree(cfg.output, run)
    shutil.rmtree(run / "final")
    cfg.output = str(run)
    train(cfg, resume=True, backend=backend())
    for a, b in zip(_metrics(Path(tmp_path / "lora"))[4:], _metrics(run)[4:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_openblas_preload_is_optional(monkeypatch):
    from redi.backends.mlx import _blas

    monkeypatch.setenv("REDI_OPENBLAS", "0")
    assert _blas._find() is None
    # too late once mlx.core is imported: the call must be a harmless no-op
    assert _blas.preload_openblas() == _blas.LOADED
