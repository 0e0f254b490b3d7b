"""Per-sequence completion log-prob sums without ``[tokens x vocab]`` logits.

Only the hidden states at scored positions go through the LM head, ``chunk`` tokens at a time, inside one
autograd function: the forward keeps per token only its log-prob and log-sum-exp; the backward recomputes
one chunk's logits at a time and turns them straight into the logits' gradient (softmax from the saved
log-sum-exp), then into the hidden and weight gradients. Extra memory is a few ``[chunk x vocab]``
buffers whatever the sequence length; a 16k-token sequence at vocab 151,936 would otherwise hold ~10 GB
of fp32 logits.

Two ways through a chunk:
- fp32 (the CPU, or CUDA without autocast): one fp32 buffer reused by every chunk, updated in place (fresh
  multi-hundred-MB allocations per chunk cost more than the arithmetic on a CPU);
- bf16 under CUDA autocast: bf16 logits from the matmul, then one fused pass each way (log-sum-exp and
  the gradient, computed in fp32 registers), compiled with torch.compile (eager if compiling fails).
  The weight gradient is accumulated in fp32.
"""
from __future__ import annotations

import torch

from redi.backends.torch_cuda.layers import COMPILE_ERRORS, warn_compile_failed


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if device == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def _lse_and_pick(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-sum-exp of each row and the target's logit, from low-precision logits."""
    return torch.logsumexp(logits.float(), dim=-1), logits.gather(1, targets[:, None]).squeeze(1).float()


def _grad_logits(logits: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """g * (onehot(target) - softmax(logits)), in the logits' dtype."""
    probs = torch.exp(logits.float() - lse[:, None])
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]
    return (g[:, None] * (onehot.float() - probs)).to(logits.dtype)


_KERNELS: dict[str, object] = {}
# fp32 softmax kept from the forward for the backward when the whole [tokens x vocab] fits in this many bytes.
KEEP_SOFTMAX_BYTES = 256 << 20


def _kernel(name: str, fn):
    """``fn`` compiled once (CUDA); the eager ``fn`` if torch.compile is unavailable or fails."""
    if name not in _KERNELS:
        _KERNELS[name] = torch.compile(fn, dynamic=True)

    def call(*args):
        compiled = _KERNELS[name]  # looked up per call: after a failure it is ``fn`` for good
        if compiled is fn:
            return fn(*args)
        try:
            return compiled(*args)
        except COMPILE_ERRORS as err:  # a compiler failure: one warning line, eager from then on
            warn_compile_failed(f"the LM-head {name}", err)
            _KERNELS[name] = fn
            return fn(*args)

    return call


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, dtype, keep_softmax):
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        n_tok = hidden.shape[0]
        out = torch.empty(n_tok, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        rows = min(chunk, n_tok)
        probs = None
        if dtype == torch.float32:
            # Small enough (short rows): keep every chunk's softmax for the backward instead of recomputing the
            # logits there, one [tokens x hidden x vocab] matmul less (profiled on SmolLM2-135M, short rows).
            keep = keep_softmax and n_tok * w.shape[0] * 4 <= KEEP_SOFTMAX_BYTES
            probs = torch.empty(n_tok, w.shape[0], dtype=torch.float32, device=hidden.device) if keep else None
            buf = probs if keep else torch.empty(rows, w.shape[0], dtype=torch.float32, device=hidden.device)
            for s in range(0, n_tok, chunk):
                h, t = hidden[s:s + chunk].to(dtype), targets[s:s + chunk, None]
                logits = torch.mm(h, w.t(), out=buf[s:s + h.shape[0]] if keep else buf[:h.shape[0]])
                if b is not None:
                    logits.add_(b)
                m = logits.max(dim=1, keepdim=True).values
                picked = logits.gather(1, t)
                total = (logits - m if keep else logits.sub_(m)).exp_().sum(dim=1, keepdim=True)
                lse[s:s + chunk] = (total.log_() + m).squeeze(1)
                out[s:s + chunk] = picked.squeeze(1) - lse[s:s + chunk]
                if keep:  # the backward's own formula, so its gradient is bit for bit the recomputed one's
                    logits.sub_(lse[s:s + chunk, None]).exp_()
            del buf
        else:
            stats = _kernel("log-sum-exp", _lse_and_pick) if hidden.is_cuda else _lse_and_pick
            for s in range(0, n_tok, chunk):
                logits = torch.nn.functional.linear(hidden[s:s + chunk].to(dtype), w, b)
                chunk_lse, picked = stats(logits, targets[s:s + chunk])
                lse[s:s + chunk] = chunk_lse
                out[s:s + chunk] = picked - chunk_lse
                del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype, ctx.probs = chunk, dtype, probs
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grad_out = grad_out.float()
        rows = min(chunk, hidden.shape[0])
        fp32 = dtype == torch.float32
        probs, ctx.probs = ctx.probs, None
        buf = torch.empty(rows, w.shape[0], dtype=torch.float32, device=hidden.device) if fp32 else None
        grad_fn = _kernel("gradient", _grad_logits) if hidden.is_cuda and not fp32 else _grad_logits
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk].to(dtype)
            g, t = grad_out[s:s + chunk], targets[s:s + chunk]
            if fp32 and probs is not None:  # the forward kept the softmax
                gl = torch.mul(probs[s:s + chunk], -g[:, None], out=buf[:h.shape[0]])
                gl.scatter_add_(1, t[:, None], g[:, None])
            elif fp32:  # in place in the reused buffer: d logp_t / d logits = onehot(target) - softmax
                gl = torch.mm(h, w.t(), out=buf[:h.shape[0]])
                if b is not None:
                    gl.add_(b)
                gl.sub_(lse[s:s + chunk, None]).exp_().mul_(-g[:, None])
                gl.scatter_add_(1, t[:, None], g[:, None])
            else:
                gl = grad_fn(torch.nn.functional.linear(h, w, b), lse[s:s + chunk], g, t)
            if need_h:
                grad_h[s:s + chunk] = (gl @ w).to(hidden.dtype)
            if need_w:
                grad_w.add_(gl.t() @ h)
            if need_b:
                grad_b.add_(gl.float().sum(0))
            del gl
        del buf
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def token_logps(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(target | hidden) for each row of ``hidden`` [N, H]; returns fp32 [N]."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    backward = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, max(1, int(chunk)), _compute_dtype(hidden), backward)


def full_token_logps(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """The plain computation (full logits, log_softmax, gather): the reference the tests compare against."""
    logits = lm_head(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   label_mask: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded path: S (fp32 sum of completion-token log-probs) and L (completion tokens scored), one per row.

    ``label_mask[b, t] = 1`` marks token t as a scored completion token; it is predicted from position t-1.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    scored = label_mask[:, 1:].bool()
    h = hidden[:, :-1][scored]
    targets = input_ids[:, 1:][scored]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(scored)[scored]
    per_token = token_logps(h, model.get_output_embeddings(), targets, chunk)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device).index_add(0, rows, per_token)
    return sums, scored.sum(dim=1)


def packed_sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                          attention_mask: dict, score_pos: torch.Tensor, targets: torch.Tensor, seq_of: torch.Tensor,
                          n_seqs: int, chunk: int = 1024) -> torch.Tensor:
    """Packed path: one row [1, T]; S per sequence from the scored positions of the row."""
    hidden = model.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                 attention_mask=attention_mask).last_hidden_state[0]
    h = hidden.index_select(0, score_pos)
    head = model.get_output_embeddings()
    per_token = token_logps(h, head, targets, chunk)
    return torch.zeros(n_seqs, dtype=torch.float32, device=hidden.device).index_add(0, seq_of, per_token)
