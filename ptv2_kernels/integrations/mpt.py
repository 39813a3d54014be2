"""P-Tuning v2 on MPT: the family adapter.

MPT's ``MptAttention`` computes its scores itself instead of going through transformers' AttentionInterface, so
:func:`~ptv2_kernels.integrations.hf_transformers.patch` replaces the ``forward`` of every bound module, on the
instance, by an :class:`MptPrefixForward`, and ``unpatch`` removes it. Its blocks pass no keyword arguments down:
the context of the running forward comes from the patch state.

The forward computes what the module computes around its attention: the fused ``Wqkv`` projection (clipped by
``clip_qkv`` when the config sets it), the head split, the cache update through the model's own cache object (real
tokens only), and the output projection. The attention is :func:`~ptv2_kernels.prefix_attention` over the slot's
prefix followed by the sequence keys:

* scores ``q·k · softmax_scale`` for prefix and sequence keys alike;
* **ALiBi** as MPT computes it: a key's bias is ``slope · (j - (Nk - 1))`` for key ``j`` of the ``Nk`` keys
  (counted over every key, padding included; the model hands the attention its ``[H, 1, max_seq_len]`` table and
  the module takes its last ``Nk`` columns), which reaches the op as ``attn_bias`` on the sequence keys. What the
  prefix keys get is the bank's ``position_bias``: with ``"cached"`` (what ``PrefixBank.from_peft`` sets) the bias a
  cache holding the prefix in front of the sequence gives them, ``slope · (s - L - (Nk - 1))`` for slot ``s`` of a
  task of ``L`` keys, through the op's ``prefix_bias``; with ``"none"`` none, the bias of the newest key;
* MPT's mask (bool, True where a key is hidden: causality and padding) reaches the sequence keys; every query sees
  the prefix; attention dropout drops prefix and sequence columns alike.

Packed (padding-free) batches are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import prefix_attention
from .adapters import (PrefixForward, alibi_prefix_bias, defining_module, merge_heads, op_masks, split_heads,
                       unpacked_context)
from .hf_transformers import _module_prefix

__all__ = ["serves", "install", "uninstall", "MptPrefixForward"]

_DEFINING_MODULES = ("transformers.models.mpt.modeling_mpt",)
_CLASS_NAME = "MptAttention"


def serves(cls) -> bool:
    """Whether attention modules of class ``cls`` are MPT's attention."""
    return defining_module(cls, _CLASS_NAME, _DEFINING_MODULES) is not None


def _sequence_alibi(position_bias: Tensor, key_length: int) -> Tensor:
    """MPT's bias of the ``key_length`` keys, ``[1, H, 1, Nk]``: the last columns of its table, as the module
    slices them."""
    if position_bias.dim() != 3:
        raise ValueError(f"MPT's position_bias must be [H, 1, max_seq_len], got shape {list(position_bias.shape)}")
    return position_bias[:, -1:, max(0, position_bias.shape[2] - key_length):].unsqueeze(0)


class MptPrefixForward(PrefixForward):
    """The forward of a bound MPT attention: its attention with the prefix of its bank slot in front of the keys
    and values (see the module docstring). Takes the module's forward arguments (the cache as ``cache``, or
    ``past_key_values`` before transformers 5.24) and returns ``(output, None)``: no attention weights."""

    def __call__(self, hidden_states: Tensor, position_bias: Tensor, cache=None, attention_mask=None,
                 past_key_values=None, **kwargs):
        module = self.module
        cache = cache if cache is not None else past_key_values
        mixed = module.Wqkv(hidden_states)
        if module.clip_qkv:
            mixed = mixed.clamp(min=-module.clip_qkv, max=module.clip_qkv)
        query, key, value = (split_heads(part, module.n_heads) for part in mixed.chunk(3, dim=2))
        if cache is not None:
            key, value = cache.update(key, value, module.layer_idx)
        key_length = key.shape[-2]
        # MPT's bool mask is True where a key is hidden; the op's, where it is visible
        visible = None if attention_mask is None else ~attention_mask.to(torch.bool)
        key_padding_mask, mask, causal = op_masks(visible, key_length, causal=True)
        context = unpacked_context(module, kwargs, "MPT", "its ALiBi positions and causal mask would span them")
        prefix_k, prefix_v, index, lengths, backend = _module_prefix(module, query, key, kwargs, context)
        bias, prefix_bias = None, None
        if position_bias is not None:
            bias = _sequence_alibi(position_bias, key_length)
            # each head's slope: the table's step between its last two columns
            slopes = (position_bias[:, 0, -1] - position_bias[:, 0, -2]).float()
            prefix_bias = alibi_prefix_bias(module, slopes, 1.0, prefix_k, index, lengths, context, query.shape[0])
            if prefix_bias is not None:  # in the sequence keys' frame, whose newest key has bias 0
                prefix_bias = prefix_bias - (slopes * (key_length - 1))[None, :, None, None]
        out = prefix_attention(query, key, value, prefix_k, prefix_v, prefix_index=index, prefix_lengths=lengths,
                               key_padding_mask=key_padding_mask, attn_mask=mask, attn_bias=bias, causal=causal,
                               scale=module.softmax_scale,
                               dropout_p=module.attn_dropout_p if module.training else 0.0, backend=backend,
                               prefix_bias=prefix_bias)
        return module.out_proj(merge_heads(out)), None


install = MptPrefixForward.install
uninstall = MptPrefixForward.uninstall
