"""Document-causal attention for packed rows, plugged into transformers' attention interface.

Each token of a packed row attends only to earlier tokens of its own sequence. Two implementations:

- CUDA: FlexAttention (compiled) with a ``BlockMask`` built straight from the document boundaries
  (``packing.block_structure``): O((T/128)^2) block tables, never a [T x T] mask. Fully visible tiles skip
  the mask function; tiles of other documents are never computed.
- Anywhere (the CPU path, and the fallback when FlexAttention is unavailable): one causal
  ``scaled_dot_product_attention`` per document. Exact, differentiable, memory O(document), but a Python
  loop over the documents of the row in every layer.

The model keeps ``sdpa`` as its attention implementation; ``packed_attention_mode`` switches the config
to ``redi_packed`` only around a packed forward, and any other mask (generation) is handed to sdpa.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from redi.backends.torch_cuda.packing import BLOCK, block_structure, doc_ids

PACKED_ATTENTION = "redi_packed"

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - old torch: the per-document path only
    BlockMask = None  # type: ignore[assignment,misc]
    flex_attention = None  # type: ignore[assignment]


@dataclass(frozen=True)
class DocumentMask:
    """The per-document path's mask: document lengths of the row; documents from ``n_real`` on are padding."""

    doc_lens: tuple[int, ...]
    n_real: int


def flex_available() -> bool:
    return flex_attention is not None


def build_block_mask(doc_lens: tuple[int, ...], device: torch.device | str, block: int = BLOCK):
    """A FlexAttention ``BlockMask`` of the document-causal mask of one row of ``sum(doc_lens)`` tokens."""
    partial, full = block_structure(doc_lens, block)
    width = int(sum(doc_lens))
    docs = torch.as_tensor(doc_ids(doc_lens), device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (docs[q_idx] == docs[kv_idx]) & (q_idx >= kv_idx)

    def tables(m: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        num = m.sum(axis=1).astype(np.int32)
        idx = np.argsort(~m, axis=1, kind="stable").astype(np.int32)  # visible key blocks first, in order
        return (torch.from_numpy(num)[None, None].to(device, non_blocking=True),
                torch.from_numpy(np.ascontiguousarray(idx))[None, None].to(device, non_blocking=True))

    kv_num, kv_idx = tables(partial)
    full_num, full_idx = tables(full)
    kwargs = {"BLOCK_SIZE": block, "mask_mod": mask_mod}
    try:
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, seq_lengths=(width, width), **kwargs)
    except TypeError:  # a torch without seq_lengths: the lengths follow from the block tables
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, **kwargs)


_COMPILED_FLEX = None


def _flex():
    """flex_attention, compiled once on CUDA (eager FlexAttention materialises the scores). On the CPU the
    eager version runs forward only (torch refuses its backward there); tests use it to check the masks."""
    global _COMPILED_FLEX
    if torch.compiler.is_compiling():
        return flex_attention  # inside a compiled layer: inlined into that graph
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=None)
    return _COMPILED_FLEX


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    # Under autocast RoPE returns fp32 q/k while v is bf16; sdpa autocasts, FlexAttention does not.
    device = q.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return q.dtype


def flex_document_attention(q, k, v, block_mask, scale: float | None) -> torch.Tensor:
    dtype = _compute_dtype(q)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    fn = _flex() if q.device.type == "cuda" else flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def per_document_attention(q, k, v, mask: DocumentMask, scale: float | None) -> torch.Tensor:
    """Causal sdpa within each document; padding documents give zeros. q [B,Hq,T,D], k/v [B,Hkv,T,D]."""
    groups = q.shape[1] // k.shape[1]
    outs, offset = [], 0
    for n, length in enumerate(mask.doc_lens):
        qs = q[:, :, offset:offset + length]
        if n >= mask.n_real:
            outs.append(torch.zeros(q.shape[0], q.shape[1], length, v.shape[-1], dtype=v.dtype, device=v.device))
        else:
            ks, vs = k[:, :, offset:offset + length], v[:, :, offset:offset + length]
            if groups > 1:  # explicit, so the CPU's memory-efficient causal kernel is used
                ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale))
        offset += length
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out


# The document mask of the packed forward in progress. Qwen2Model hands each layer its entry of the mask mapping;
# LlamaModel (transformers 5.25) runs create_causal_mask, which returns None for an attention implementation it
# does not know, and its layers then attended across documents (SmolLM2: up to 12 nats; docs/real-model.md).
_ACTIVE_MASK: DocumentMask | BlockMask | None = None


def use_document_mask(mask) -> None:
    """The mask ``packed_attention`` applies when a decoder passes none (until ``packed_attention_mode`` ends)."""
    global _ACTIVE_MASK
    _ACTIVE_MASK = mask


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """transformers' attention-interface signature; returns ([B, T, Hq, D], None)."""
    if attention_mask is None:
        attention_mask = _ACTIVE_MASK
    if isinstance(attention_mask, DocumentMask):
        out = per_document_attention(query, key, value, attention_mask, scaling)
    elif BlockMask is not None and isinstance(attention_mask, BlockMask):
        out = flex_document_attention(query, key, value, attention_mask, scaling)
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_ATTENTION, packed_attention)
        _REGISTERED = True


@contextlib.contextmanager
def packed_attention_mode(model):
    """Route the model's attention through ``packed_attention`` for the duration of one forward."""
    register()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
        use_document_mask(None)


def layer_mask_mapping(config, mask) -> dict:
    """The per-layer-type mask dict transformers' decoders accept as ``attention_mask``."""
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise NotImplementedError("packed attention does not implement sliding-window layers; set packing=false")
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return {t: mask for t in types | {"full_attention"}}
