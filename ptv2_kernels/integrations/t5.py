"""T5's relative position bias on the prefix columns, for banks that stand where a cache would hold them.

A bank's ``position_bias`` says what a position-dependent score bias gives the prefix keys. With ``"none"`` (the
default, Li & Liang's prefix tuning) they get none: T5's bias reaches the op as ``attn_bias`` on the sequence keys
alone. With ``"cached"`` (what :meth:`~ptv2_kernels.PrefixBank.from_peft` sets: PEFT puts the prefix in the
model's cache) slot ``s`` of a sample whose task has ``L`` prefix keys sits at position ``s`` and the real tokens
after it, so query ``i`` (at ``L + past + i``) sees slot ``s`` at the relative position ``s - L - past - i``, which
T5 buckets and looks up in its table like any other. The sequence keys' relative positions do not change. This
bias reaches the op as ``prefix_bias``.

T5 and mT5 keep the table in the first layer's self-attention of each stack and hand the bias on; UMT5 has one
per layer. Cross-attention has no position bias.
"""

from __future__ import annotations

import inspect
import re
from typing import Optional, Union

import torch
from torch import Tensor, nn

# The families whose relative position bias this module can place on the prefix columns.
MODEL_TYPES = ("t5", "mt5", "umt5")


def relative_bias_table_owner(model: nn.Module, name: str, module: nn.Module) -> Optional[nn.Module]:
    """The attention module whose table gives the bias of the attention ``module`` (named ``name`` in ``model``),
    or None where there is no bias (cross-attention)."""
    if getattr(module, "has_relative_attention_bias", False):
        return module
    if "EncDecAttention" in name:
        return None
    first = re.sub(r"\bblock\.\d+\.", "block.0.", name)  # the stack's first layer holds the table
    owner = model.get_submodule(first)
    return owner if getattr(owner, "has_relative_attention_bias", False) else None


def cached_prefix_bias(owner: nn.Module, q_len: int, k_len: int, prefix_len: int,
                       lengths: Union[int, Tensor]) -> Tensor:
    """The bias of the prefix columns as a cache holding the prefix gives it: ``[1, H, Nq, P]`` for one prefix
    length ``lengths`` shared by the batch, ``[B, H, Nq, P]`` for a ``[B]`` tensor of each sample's own.
    Self-attention's queries are the last ``q_len`` of its ``k_len`` keys (the cache holds the rest)."""
    device = owner.relative_attention_bias.weight.device
    queries = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    slots = torch.arange(prefix_len, device=device)[None, :]
    if isinstance(lengths, Tensor):
        relative = slots[None] - (queries[None] + lengths.to(device=device, dtype=torch.long)[:, None, None])
    else:
        relative = (slots - (queries + lengths))[None]
    return owner.relative_attention_bias(_buckets(owner, relative)).permute(0, 3, 1, 2)


def _buckets(owner: nn.Module, relative: Tensor) -> Tensor:
    bucket = owner._relative_position_bucket
    if "bidirectional" in inspect.signature(bucket).parameters:  # T5, mT5: a static method given the config
        return bucket(relative, bidirectional=not owner.is_decoder, num_buckets=owner.relative_attention_num_buckets,
                      max_distance=owner.relative_attention_max_distance)
    return bucket(relative)  # UMT5: a method reading its own config
