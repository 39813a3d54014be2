"""Packed (padding-free) batches in a patched transformers model.

transformers trains without padding by packing a batch's sequences into one row (``DataCollatorWithFlattening``):
``input_ids [1, total]`` with ``position_ids`` restarting at 0 for each sequence and no attention mask, and, with
``return_flash_attn_kwargs=True``, the cumulative lengths ``cu_seq_lens_q/k`` and ``max_length_q/k`` as keyword
arguments. A patched model recognizes such a call once per forward (:func:`packing_of_call`) and every attention
layer then runs :func:`ptv2_kernels.prefix_attention_varlen` on the packed row: each sequence attends to its own
task's prefix and its own tokens, and no ``[total, total]`` mask is ever made. ``task_ids`` then gives one task per
packed sequence (or one for all), and ``positions="shifted"`` shifts each sequence's positions by its own task's
prefix length.

A sequence boundary is where the positions do not go up by one, the rule transformers' own packed-sequence mask
uses, so the patched model splits a row exactly where the unpatched one would.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class Packing:
    """The sequences of a packed row: cumulative lengths (int32 ``[S + 1]`` on the inputs' device), each
    sequence's length (``[S]``, same device), the longest length and the token total (host ints)."""

    __slots__ = ("cu_seqlens", "lengths", "max_seqlen", "total")

    def __init__(self, cu_seqlens: Tensor, max_seqlen: int, total: int):
        self.cu_seqlens = cu_seqlens
        self.lengths = cu_seqlens.diff()
        self.max_seqlen = max_seqlen
        self.total = total

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    def serves(self, batch: int, q_length: int, kv_length: int) -> bool:
        """Whether an attention (or mask) call of these sizes is over this packed row."""
        return batch == 1 and q_length == self.total and kv_length == self.total

    def token_shift(self, per_sequence: Tensor) -> Tensor:
        """``per_sequence`` ``[S]`` values spread to the row's tokens, ``[1, total]``."""
        return per_sequence.repeat_interleave(self.lengths, output_size=self.total).view(1, self.total)


def packing_of_call(position_ids: Optional[Tensor], attention_mask, past_length: int, lead: Optional[tuple],
                    kwargs: dict) -> Optional[Packing]:
    """The packing of a model call, or None for an ordinary (padded or single-sequence) batch.

    Packed: a batch of one row without an attention mask and without cached tokens, whose sequences come either
    as ``cu_seq_lens_q`` (and ``cu_seq_lens_k``, ``max_length_q``) keyword arguments or as ``position_ids``
    that restart (one device read of the positions)."""
    if lead != (1,) or attention_mask is not None or past_length:
        return None
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        keys = kwargs.get("cu_seq_lens_k")
        if keys is not None and keys is not cu_seqlens and not torch.equal(keys, cu_seqlens):
            raise NotImplementedError("a patched model serves packed sequences whose keys are their queries "
                                      "(cu_seq_lens_k == cu_seq_lens_q); got different cumulative lengths")
        cu_seqlens = cu_seqlens.reshape(-1).to(torch.int32)
        longest = kwargs.get("max_length_q")
        host = None
        if longest is None:
            host = cu_seqlens.tolist()
            longest = max((b - a for a, b in zip(host, host[1:])), default=0)
        total = int(host[-1]) if host is not None else int(cu_seqlens[-1])
        return Packing(cu_seqlens, int(longest), total)
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    positions = position_ids[0].tolist()  # one read
    starts = [0] + [i for i in range(1, len(positions)) if positions[i] - positions[i - 1] != 1]
    if len(starts) == 1:
        return None  # one sequence: the ordinary path serves it
    bounds = starts + [len(positions)]
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32).to(position_ids.device, non_blocking=True)
    return Packing(cu_seqlens, longest, len(positions))
