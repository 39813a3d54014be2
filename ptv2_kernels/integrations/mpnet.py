"""P-Tuning v2 on MPNet: the family adapter.

MPNet's ``MPNetSelfAttention`` computes its scores itself instead of going through transformers'
AttentionInterface, so :func:`~ptv2_kernels.integrations.hf_transformers.patch` replaces the ``forward`` of every
bound module, on the instance, by an :class:`MPNetPrefixForward`, and ``unpatch`` removes it. Its layers pass no
keyword arguments down: the context of the running forward comes from the patch state.

The forward computes what the module computes around its attention: the query/key/value projections, the head
split and the output projection (``o``, part of this module in MPNet). The attention is
:func:`~ptv2_kernels.prefix_attention` over the slot's prefix followed by the sequence keys:

* scores ``q·k / sqrt(D)`` for prefix and sequence keys alike;
* **the relative position bias** (the encoder's ``position_bias``, computed once per forward from the real
  tokens' relative positions, from 0) reaches the op as ``attn_bias``, on the sequence keys only: **the prefix
  columns get zero bias**, as the T5 default of this package (Li & Liang's prefix tuning). The prefix has no
  position relative to the tokens, and MPNet's official code has no prefix to follow; the bias table stays
  trainable through the op's bias gradient;
* the model's padding mask (eager: additive float) reaches the sequence keys as the module adds it; every query
  sees the prefix; attention dropout drops prefix and sequence columns alike.

With ``positions="shifted"`` (patch's default) the absolute positions of the real tokens start after the prefix,
counted as MPNet counts them (from ``padding_idx + 1``, padding tokens keep ``padding_idx``), as RoBERTa's are.
Packed (padding-free) batches are refused.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..ops import prefix_attention
from .adapters import PrefixForward, defining_module, merge_heads, op_masks, split_heads, unpacked_context
from .hf_transformers import _module_prefix

__all__ = ["serves", "install", "uninstall", "MPNetPrefixForward"]

_DEFINING_MODULES = ("transformers.models.mpnet.modeling_mpnet",)
_CLASS_NAME = "MPNetSelfAttention"


def serves(cls) -> bool:
    """Whether attention modules of class ``cls`` are MPNet's self-attention."""
    return defining_module(cls, _CLASS_NAME, _DEFINING_MODULES) is not None


class MPNetPrefixForward(PrefixForward):
    """The forward of a bound MPNet self-attention: its attention with the prefix of its bank slot in front of the
    keys and values (see the module docstring). Takes the module's forward arguments and returns ``(output,)``, or
    ``(output, None)`` with ``output_attentions``: no attention weights."""

    def __call__(self, hidden_states: Tensor, attention_mask=None, position_bias=None, output_attentions=False,
                 **kwargs):
        module = self.module
        heads = module.num_attention_heads
        query, key, value = (split_heads(proj(hidden_states), heads) for proj in (module.q, module.k, module.v))
        key_padding_mask, mask, _ = op_masks(attention_mask, key.shape[-2], causal=False)
        context = unpacked_context(module, kwargs, "MPNet", "its relative positions would span them")
        prefix_k, prefix_v, index, lengths, backend = _module_prefix(module, query, key, kwargs, context)
        out = prefix_attention(query, key, value, prefix_k, prefix_v, prefix_index=index, prefix_lengths=lengths,
                               key_padding_mask=key_padding_mask, attn_mask=mask, attn_bias=position_bias,
                               scale=1.0 / math.sqrt(module.attention_head_size),
                               dropout_p=module.dropout.p if module.training else 0.0, backend=backend)
        output = module.o(merge_heads(out))
        return (output, None) if output_attentions else (output,)


install = MPNetPrefixForward.install
uninstall = MPNetPrefixForward.uninstall
