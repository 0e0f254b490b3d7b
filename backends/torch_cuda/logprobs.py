"""Per-sequence completion log-prob sums without ``[tokens x vocab]`` logits.

Only the hidden states at completion positions go through the LM head, ``chunk`` tokens at a time. Each
chunk runs under activation checkpointing, so its ``[chunk x vocab]`` logits exist only transiently in the
forward pass and are recomputed one chunk at a time in the backward pass. A 16k-token sequence at vocab
151,936 would otherwise hold ~10 GB of fp32 logits.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(target | hidden) for each row of ``hidden`` [N, H]; returns fp32 [N]."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            parts.append(checkpoint(_chunk_logps, h, weight, bias, t, use_reentrant=False))
        else:
            parts.append(_chunk_logps(h, weight, bias, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   label_mask: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """S (fp32 sum of completion-token log-probs) and L (completion tokens scored), one per row.

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
