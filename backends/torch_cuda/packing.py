"""Padding-free packing: every sequence of a micro-batch (chosen and rejected of each pair) in one row.

The row holds the sequences back to back, position ids restart at 0 for each, and the row is padded only
at its end, to a multiple of the attention block size. Attention must then be restricted to each
sequence's own tokens (a document-causal mask, see ``attention.py``): restarting position ids alone does
not isolate the sequences in transformers' sdpa or flex paths (platform-notes.md, measured).

Only numpy here; the backend moves the arrays to the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from redi.backend import MicroBatch

BLOCK = 128  # FlexAttention's default block size; the packed row is padded to a multiple of it


@dataclass
class PackedRow:
    """One packed row. ``doc_lens`` covers the whole row: the sequences, then one padding document."""

    input_ids: np.ndarray  # [T] int64
    position_ids: np.ndarray  # [T] int64, restarting at 0 for every document
    doc_lens: tuple[int, ...]  # lengths of the documents, summing to T (the last one may be padding)
    n_seqs: int  # real sequences; doc_lens[n_seqs:] is padding
    score_pos: np.ndarray  # [N] row positions whose hidden state predicts a scored completion token
    targets: np.ndarray  # [N] the token each of those positions predicts
    seq_of: np.ndarray  # [N] which sequence each scored position belongs to
    lengths: np.ndarray  # [n_seqs] L: completion tokens scored per sequence

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def real_tokens(self) -> int:
        return int(sum(self.doc_lens[: self.n_seqs]))


def pack(batch: MicroBatch, pad_id: int, multiple: int = BLOCK) -> PackedRow:
    """Pack ``batch.seqs`` in order into one row padded to ``multiple``.

    Token t of a sequence is scored when it is a completion token and t >= 1 (it is predicted from t-1),
    exactly the tokens ``MicroBatch.padded`` marks, so S and L are those of the padded computation.
    """
    total = sum(s.length for s in batch.seqs)
    width = max(multiple, int(math.ceil(total / multiple) * multiple))
    ids = np.full(width, pad_id, dtype=np.int64)
    pos = np.zeros(width, dtype=np.int64)
    score_pos, seq_of, lengths, doc_lens = [], [], [], []
    offset = 0
    for i, s in enumerate(batch.seqs):
        p, c = len(s.prompt), len(s.completion)
        n = p + c
        ids[offset:offset + p] = s.prompt
        ids[offset + p:offset + n] = s.completion
        pos[offset:offset + n] = np.arange(n)
        first = max(p, 1)  # token 0 has no predecessor
        scored = np.arange(offset + first - 1, offset + n - 1)
        score_pos.append(scored)
        seq_of.append(np.full(scored.shape[0], i, dtype=np.int64))
        lengths.append(scored.shape[0])
        doc_lens.append(n)
        offset += n
    if width > total:
        doc_lens.append(width - total)
        pos[total:] = np.arange(width - total)
    score_pos_arr = np.concatenate(score_pos) if score_pos else np.zeros(0, dtype=np.int64)
    return PackedRow(
        input_ids=ids, position_ids=pos, doc_lens=tuple(doc_lens), n_seqs=len(batch.seqs),
        score_pos=score_pos_arr.astype(np.int64), targets=ids[score_pos_arr + 1] if score_pos_arr.size else score_pos_arr,
        seq_of=np.concatenate(seq_of) if seq_of else np.zeros(0, dtype=np.int64),
        lengths=np.asarray(lengths, dtype=np.int64),
    )


def doc_ids(doc_lens: tuple[int, ...]) -> np.ndarray:
    """[T] document index of every token of the row."""
    return np.repeat(np.arange(len(doc_lens), dtype=np.int32), doc_lens)


def block_structure(doc_lens: tuple[int, ...], block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Which (query block, key block) tiles of a document-causal mask are partly and fully unmasked.

    Returns two boolean [nb, nb] arrays: ``partial`` (some but not all pairs attend) and ``full`` (every
    pair attends). Documents are contiguous and in increasing order, so for key block j <= query block i
    the tile has a visible pair iff the last document of block j is at least the first document of block
    i, and is full iff j < i and both blocks lie inside one document. O((T / block)^2), never O(T^2).
    """
    docs = doc_ids(doc_lens)
    width = docs.shape[0]
    if width % block:
        raise ValueError(f"row width {width} is not a multiple of the block size {block}")
    nb = width // block
    first = docs[::block]  # document of each block's first token
    last = docs[block - 1::block]  # document of each block's last token
    i = np.arange(nb)[:, None]
    j = np.arange(nb)[None, :]
    causal = j <= i
    visible = causal & (last[None, :] >= first[:, None])
    full = (j < i) & (first[None, :] == last[:, None])
    return visible & ~full, full
