"""Correctness gates of the torch backend's padding-free path (CPU, fp32).

- packed vs padded per-sequence log-probs, and chunked vs full LM head: 1e-5;
- one REDI step's gradient against the plain computation (one unpadded forward per sequence, full
  logits, log_softmax): cosine >= 0.999;
- the FlexAttention block mask built from document boundaries equals torch's ``create_block_mask`` of the
  document-causal ``mask_mod``, and FlexAttention with it equals per-document attention (forward: torch
  has no FlexAttention backward on the CPU; the CUDA tests run the backward);
- peak RSS of one REDI step on a pair of 8,000 + 8,000 completion tokens at vocabulary 151,936 <= 3 GB.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from redi.backends.torch_cuda import layers  # noqa: E402
from redi.backends.torch_cuda.attention import (DocumentMask, build_block_mask, flex_available,  # noqa: E402
                                               per_document_attention)
from redi.backends.torch_cuda.backend import TorchBackend  # noqa: E402
from redi.backends.torch_cuda.logprobs import full_token_logps, token_logps  # noqa: E402
from redi.backends.torch_cuda.optim import AdamWLowPrecisionState, grad_norm_and_clip, step_with_norms  # noqa: E402
from redi.backends.torch_cuda.distributed import Dist  # noqa: E402
from redi.backends.torch_cuda.packing import block_structure, pack  # noqa: E402
from redi.training.batching import token_groups  # noqa: E402
from redi.backend import MicroBatch  # noqa: E402
from redi.data import TokenizedSeq  # noqa: E402
from redi.training.loop import StageRun, micro_batch_loss  # noqa: E402
from redi.objectives import make_objective  # noqa: E402

# (prompt, completion) lengths: an empty prompt, a one-token completion, long and short documents.
SHAPES = [(5, 40), (0, 17), (12, 1), (30, 90), (3, 7), (21, 64)]


def _batch(vocab: int, shapes=SHAPES, seed: int = 0, pairs: bool = True) -> MicroBatch:
    rng = np.random.default_rng(seed)
    seqs = [TokenizedSeq(rng.integers(0, vocab, p).astype(np.int32), rng.integers(0, vocab, c).astype(np.int32))
            for p, c in shapes]
    n = len(seqs) // 2 if pairs else 0
    return MicroBatch(seqs, n, 1.0, np.arange(max(n, len(seqs))))


def _backend(model_dir, **options) -> TorchBackend:
    b = TorchBackend("cpu", **options)
    b.load(model_dir, lm_head_chunk=7)
    return b


def _vocab(backend) -> int:
    return backend.model.config.vocab_size


def test_pack_marks_exactly_the_padded_scored_tokens(tiny_model_dir):
    batch = _batch(50)
    row = pack(batch, pad_id=0, multiple=128)
    assert row.width % 128 == 0 and row.width >= row.real_tokens == sum(p + c for p, c in SHAPES)
    assert sum(row.doc_lens) == row.width and row.n_seqs == len(SHAPES)
    padded = batch.padded(0)
    want_l = padded["label_mask"][:, 1:].sum(1)
    np.testing.assert_array_equal(row.lengths, want_l)
    offsets = np.cumsum([0] + [p + c for p, c in SHAPES])
    for i in range(len(SHAPES)):
        pos = row.score_pos[row.seq_of == i] - offsets[i]
        want = np.nonzero(padded["label_mask"][i, 1:])[0]
        np.testing.assert_array_equal(pos, want)
        np.testing.assert_array_equal(row.targets[row.seq_of == i], padded["input_ids"][i, want + 1])
        np.testing.assert_array_equal(row.position_ids[offsets[i]:offsets[i + 1]], np.arange(offsets[i + 1] - offsets[i]))


def test_packed_equals_padded_logps(tiny_model_dir):
    packed, padded = _backend(tiny_model_dir), _backend(tiny_model_dir, packing=False)
    batch = _batch(_vocab(packed))
    s1, l1 = packed.sequence_logps(batch)
    s2, l2 = padded.sequence_logps(batch)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(s1, s2, atol=1e-5, rtol=0)


@pytest.mark.skipif(not flex_available(), reason="torch without FlexAttention")
def test_flex_path_through_the_model_equals_padded(tiny_model_dir):
    """The CUDA path's wiring (BlockMask through transformers' decoder into FlexAttention), forward only:
    torch has no FlexAttention backward on the CPU."""
    flex, padded = _backend(tiny_model_dir), _backend(tiny_model_dir, packing=False)
    flex.use_flex = True
    batch = _batch(_vocab(flex))
    s1, _ = flex.sequence_logps(batch)
    s2, _ = padded.sequence_logps(batch)
    # rtol 2e-7: an fp32 sum of ~475 nats has a 3e-5 ulp, so the two summation orders may differ by one ulp.
    np.testing.assert_allclose(s1, s2, atol=1e-5, rtol=2e-7)


def test_packed_sequences_are_isolated(tiny_model_dir):
    """Changing one sequence's tokens leaves every other sequence's S unchanged (a real document mask)."""
    backend = _backend(tiny_model_dir)
    batch = _batch(_vocab(backend))
    before, _ = backend.sequence_logps(batch)
    batch.seqs[2] = TokenizedSeq(batch.seqs[2].prompt[::-1].copy(), (batch.seqs[2].completion + 1) % 50)
    after, _ = backend.sequence_logps(batch)
    keep = [i for i in range(len(SHAPES)) if i != 2]
    np.testing.assert_allclose(after[keep], before[keep], atol=1e-6, rtol=0)
    assert abs(after[2] - before[2]) > 1e-3


def _chunked_head_run(bias: bool):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=bias)
    hidden = torch.randn(53, 16, requires_grad=True)
    targets = torch.randint(0, 300, (53,))
    weights = torch.randn(53)
    got = token_logps(hidden, head, targets, chunk=8)
    (got * weights).sum().backward()
    return head, hidden, targets, weights, got, hidden.grad.clone(), head.weight.grad.clone()


@pytest.mark.parametrize("keep_softmax", [True, False])
def test_chunked_head_equals_full_logits_values_and_grads(keep_softmax, monkeypatch):
    from redi.backends.torch_cuda import logprobs

    if not keep_softmax:  # the long-row path: logits recomputed chunk by chunk in the backward
        monkeypatch.setattr(logprobs, "KEEP_SOFTMAX_BYTES", 0)
    head, hidden, targets, weights, got, g_h, g_w = _chunked_head_run(bias=False)
    hidden.grad = head.weight.grad = None
    want = full_token_logps(hidden, head, targets)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_h, hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_w, head.weight.grad, atol=1e-5, rtol=1e-5)


def test_kept_softmax_gives_the_recomputed_gradient_bit_for_bit(monkeypatch):
    from redi.backends.torch_cuda import logprobs

    kept = _chunked_head_run(bias=True)
    monkeypatch.setattr(logprobs, "KEEP_SOFTMAX_BYTES", 0)
    recomputed = _chunked_head_run(bias=True)
    for a, b in zip(kept[4:], recomputed[4:]):
        assert torch.equal(a, b)


def _plain_redi_grads(model_dir, batch):
    """The plain computation: an unpadded forward per sequence, full logits, log_softmax, REDI loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    s, n = [], []
    for seq in batch.seqs:
        ids = torch.from_numpy(np.concatenate([seq.prompt, seq.completion]).astype(np.int64))[None]
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        first = max(len(seq.prompt), 1)
        t = torch.arange(first, ids.shape[1])
        s.append(logp[t - 1, ids[0, t]].sum())
        n.append(len(t))
    s, n = torch.stack(s), torch.tensor(n, dtype=torch.float32)
    k = batch.n_pairs
    loss = (-s[:k] / n[:k] + 0.8 * s[k:] / n[k:]).mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, float(loss.detach())


@pytest.mark.parametrize("checkpointing", ["none", "1", "full"])
def test_one_step_gradient_matches_plain_computation(tiny_model_dir, checkpointing):
    backend = _backend(tiny_model_dir, activation_checkpointing=checkpointing)
    backend.init_optimizer(weight_decay=0.0)
    batch = _batch(_vocab(backend))
    run = StageRun("pairs", None, [], make_objective("redi", alpha=0.8), 0)
    backend.forward_backward(batch, micro_batch_loss(run, batch))
    assert backend.last_checkpointed_layers == {"none": 0, "1": 1, "full": 2}[checkpointing]
    got = {name: p.grad for name, p in backend.model.named_parameters() if p.grad is not None}
    want, _ = _plain_redi_grads(tiny_model_dir, batch)
    assert set(got) == set(want)
    a = torch.cat([got[k].flatten() for k in sorted(want)])
    b = torch.cat([want[k].flatten() for k in sorted(want)])
    cosine = float(a @ b / (a.norm() * b.norm()))
    assert cosine >= 0.999, cosine
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_block_structure_matches_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    rng = np.random.default_rng(1)
    for trial in range(6):
        lens = [int(x) for x in rng.integers(1, 300, size=rng.integers(1, 7))]
        total = sum(lens)
        width = -(-total // 128) * 128
        doc_lens = tuple(lens + ([width - total] if width > total else []))
        docs = torch.repeat_interleave(torch.arange(len(doc_lens)), torch.tensor(doc_lens))

        def mask_mod(b, h, q, kv):
            return (docs[q] == docs[kv]) & (q >= kv)

        ref = create_block_mask(mask_mod, None, None, width, width, device="cpu")
        ours = build_block_mask(doc_lens, "cpu")
        torch.testing.assert_close(ours.to_dense(), ref.to_dense())
        partial, full = block_structure(doc_lens)
        assert int(ref.full_kv_num_blocks.sum()) == int(full.sum())
        assert int(ref.kv_num_blocks.sum()) == int(partial.sum())


@pytest.mark.skipif(not flex_available(), reason="torch without FlexAttention")
def test_flex_attention_with_document_mask_equals_per_document_attention():
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    doc_lens = (100, 37, 200, 50, 125)  # 512 tokens, the last document is padding
    q = torch.randn(1, 4, 512, 16)
    k, v = torch.randn(1, 2, 512, 16), torch.randn(1, 2, 512, 16)
    with torch.no_grad():
        flex = flex_attention(q, k, v, block_mask=build_block_mask(doc_lens, "cpu"), enable_gqa=True)
        ref = per_document_attention(q, k, v, DocumentMask(doc_lens, 4), None)
    torch.testing.assert_close(flex[:, :, :387], ref[:, :, :387], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not flex_available(), reason="torch without FlexAttention")
def test_compiled_flex_does_not_recompile_per_document_layout():
    """Every micro-batch brings a new BlockMask and mask_mod closure: dynamo must guard on the closure's
    code, not its identity, or CUDA would recompile FlexAttention every step. aot_eager here (the guards
    are the same as inductor's); one recompile when the row width first changes (it turns dynamic)."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    fn = torch.compile(flex_attention, backend="aot_eager")
    new = []
    for lens in [(510, 105, 409), (400, 507, 117), (1003, 4, 17), (600, 500, 52), (700, 500, 80), (900, 403, 105)]:
        width = -(-sum(lens) // 128) * 128
        doc_lens = lens + ((width - sum(lens),) if width > sum(lens) else ())
        q, k, v = torch.randn(1, 4, width, 16), torch.randn(1, 2, width, 16), torch.randn(1, 2, width, 16)
        before = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            fn(q, k, v, block_mask=build_block_mask(doc_lens, "cpu"), enable_gqa=True)
        new.append(counters["stats"]["unique_graphs"] - before)
    assert new[0] == 1 and sum(new[1:]) <= 1, new


def test_checkpoint_plan_fits_budget():
    mm = layers.MemoryModel(hidden=1536, kv=256, intermediate=8960, layers=28)
    none, full = mm.activation_bytes(16384, 0), mm.activation_bytes(16384, 28)
    assert full < none / 10
    from redi.layer_checkpointing import checkpointing_mode, fixed_checkpoint_layers
    from redi.errors import UserError

    assert checkpointing_mode("auto:24") == ("auto", 24.0) and checkpointing_mode("7") == ("count", 7)
    assert [fixed_checkpoint_layers(m, 28) for m in ("none", "full", "7", "99", "auto")] == [0, 28, 7, 28, None]
    with pytest.raises(UserError):
        checkpointing_mode("sometimes")
    fake = [torch.nn.Module() for _ in range(5)]
    layers.set_checkpointed(fake, 2)
    assert sum(m._redi_checkpoint for m in fake) == 2


def test_token_groups():
    assert token_groups([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]


def test_bf16_moment_adamw_tracks_torch_adamw_and_bucketed_update_norm():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(30))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = AdamWLowPrecisionState([{"params": params, "weight_decay": 0.1}], lr=1e-2, state_dtype=torch.float32)
    torch_opt = torch.optim.AdamW([{"params": ref, "weight_decay": 0.1}], lr=1e-2)
    single = Dist("cpu")
    for step in range(3):
        for p, r in zip(params, ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g.clone(), g.clone()
        u1 = step_with_norms(ours, params, single, bucket_numel=100)  # several buckets
        before = [r.detach().clone() for r in ref]
        torch_opt.step()
        u2 = float(torch.sqrt(sum(((r.detach() - b) ** 2).sum() for r, b in zip(ref, before))))
        assert u1 == pytest.approx(u2, rel=1e-4)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), atol=1e-6, rtol=1e-6)
    low = AdamWLowPrecisionState([{"params": [torch.nn.Parameter(torch.full((8,), 0.02))], "weight_decay": 0.0}],
                                 lr=1e-6)
    p = low.param_groups[0]["params"][0]
    p.grad = torch.full((8,), 0.5)
    low.step()
    assert low.state[p]["exp_avg"].dtype == torch.bfloat16
    # The weights stay fp32: an update of 1e-6 on 0.02 survives (in bf16 it would round away).
    assert float((0.02 - p.detach()).mean()) == pytest.approx(1e-6, rel=1e-2)


def test_unbucketed_update_norm_is_the_measured_change_and_grad_clip_skips_at_one():
    """The CPU's path (bucket_numel None): the norm of (after - before), step after step with the buffer reused."""
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(30))]
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.1}], lr=1e-2, fused=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        before = [p.detach().clone() for p in params]
        got = step_with_norms(opt, params, Dist("cpu"), bucket_numel=None)
        want = float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before))))
        assert got == pytest.approx(want, rel=1e-6) and want > 0
    grads = [p.grad.clone() for p in params]
    norm = grad_norm_and_clip(params, 1e6, Dist("cpu"))  # far below the cap: gradients untouched
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    grad_norm_and_clip(params, 0.5 * float(norm), Dist("cpu"))
    assert float(torch.sqrt(sum((p.grad ** 2).sum() for p in params))) == pytest.approx(0.5 * float(norm), rel=1e-5)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, tempfile
    from pathlib import Path
    import numpy as np
    from safetensors.numpy import save_file
    from redi.tiny import TinyQwen2, qwen2_config, random_qwen2_weights
    V = 151936
    out = Path(tempfile.mkdtemp())
    shape = TinyQwen2(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=16384)
    (out / "config.json").write_text(json.dumps(qwen2_config(shape, V, V - 1)))
    save_file(random_qwen2_weights(shape, V, 0), str(out / "model.safetensors"), metadata={"format": "pt"})
    from redi.backends.torch_cuda.backend import TorchBackend
    from redi.backend import MicroBatch
    from redi.data import TokenizedSeq
    from redi.training.loop import StageRun, micro_batch_loss
    from redi.objectives import make_objective
    rng = np.random.default_rng(0)
    seq = lambda: TokenizedSeq(rng.integers(0, V, 16).astype(np.int32), rng.integers(0, V, 8000).astype(np.int32))
    backend = TorchBackend("cpu")
    backend.load(str(out))
    backend.init_optimizer(weight_decay=0.0)
    batch = MicroBatch([seq(), seq()], 1, 1.0, np.arange(1))
    run = StageRun("pairs", None, [], make_objective("redi"), 0)
    s, n = backend.forward_backward(batch, micro_batch_loss(run, batch))
    update = backend.optimizer_step(1e-6, 1.0)
    print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "L": n.tolist(), "S": s.tolist(), "update_norm": update["update_norm"]}))
""")


def test_long_pair_full_vocab_step_peak_rss_under_3gb(tmp_path):
    """One REDI step, 8,000 + 8,000 completion tokens, vocab 151,936: one fp32 copy of the logits alone
    would be 9.7 GB. Run in a fresh process so ru_maxrss is this step's peak (Linux: KiB)."""
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["L"] == [8000, 8000]
    assert all(np.isfinite(result["S"])) and result["update_norm"] > 0
    assert result["peak_rss_gb"] <= 3.0, result


def test_bf16_chunk_path_equals_bf16_full_logits():
    """The CUDA-autocast path of the LM head (bf16 logits, fused fp32 statistics), run eagerly on the CPU."""
    from redi.backends.torch_cuda.logprobs import _ChunkedTokenLogps

    torch.manual_seed(0)
    w = (torch.randn(300, 16) * 0.3).requires_grad_()
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    weights = torch.randn(37)
    got = _ChunkedTokenLogps.apply(hidden, w, None, targets, 8, torch.bfloat16, True)
    (got * weights).sum().backward()
    g_h, g_w = hidden.grad.clone(), w.grad.clone()
    hidden.grad = w.grad = None
    logits = (hidden.bfloat16() @ w.bfloat16().t()).float()
    want = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert g_w.dtype == torch.float32
    torch.testing.assert_close(g_h, hidden.grad, atol=2e-2, rtol=2e-2)  # bf16 rounding of the logits' grad
    torch.testing.assert_close(g_w, w.grad, atol=2e-2, rtol=2e-2)


@pytest.mark.slow  # ~10 s of dynamo tracing on an idle 2-core box
def test_compiled_checkpointed_layers_match_eager(tiny_model_dir, monkeypatch):
    """The layer wrappers with torch.compile (traced by dynamo; aot_eager here, inductor on CUDA) and
    checkpointing give the eager gradients."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager", dynamic=True))
    grads = []
    for compiled in (False, True):
        backend = TorchBackend("cpu", activation_checkpointing="1")
        backend.load(tiny_model_dir, lm_head_chunk=7)
        if compiled:  # the CPU path never compiles on its own; wrap the layers again, compiled
            for layer in backend.layers:
                layer._redi_wrapped = False
                layer.forward = type(layer).forward.__get__(layer)
            layers.install(backend.layers, compile_layers=True)
        backend.init_optimizer(weight_decay=0.0)
        batch = _batch(_vocab(backend))
        run = StageRun("pairs", None, [], make_objective("redi"), 0)
        backend.forward_backward(batch, micro_batch_loss(run, batch))
        grads.append(torch.cat([p.grad.flatten() for p in backend.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
