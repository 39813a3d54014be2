"""P-Tuning v2 on BLOOM: the family adapter.

BLOOM's ``BloomAttention`` computes its attention itself instead of going through transformers'
AttentionInterface, so :func:`~ptv2_kernels.integrations.hf_transformers.patch` replaces the ``forward`` of every
bound module, on the instance, by a :class:`BloomPrefixForward`, and ``unpatch`` removes it. Its layers pass no
keyword arguments down: the context of the running forward comes from the patch state.

The forward computes what the module computes around its attention: the fused query/key/value projection split
per head (the module's own ``_reshape``), the cache update through the module's own cache object
(``layer_past.update``, real tokens only), the output projection (``dense``, or its ``pretraining_tp`` slices when
``slow_but_exact``) and the residual's dropout-add. The attention is :func:`~ptv2_kernels.prefix_attention` over
the slot's prefix followed by the sequence keys, scaled by ``inv_norm_factor``, with the model's ALiBi tensor
(``slope · position`` per key, positions counted over the real tokens) as ``attn_bias`` on the sequence keys, the
model's mask (an additive float mask, causal) on them, and attention dropout in training. The prefix keys get
ALiBi as a cache holding them in front of the sequence would give it when the bank's ``position_bias`` is
``"cached"`` (what :meth:`~ptv2_kernels.PrefixBank.from_peft` sets: PEFT's prefix), none with ``"none"``
(:func:`~.adapters.alibi_prefix_bias`). Packed (padding-free) batches are refused.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import prefix_attention
from .adapters import PrefixForward, alibi_prefix_bias, alibi_slopes, defining_module, merge_heads, op_masks, \
    unpacked_context
from .hf_transformers import _module_prefix

__all__ = ["serves", "install", "uninstall", "BloomPrefixForward"]

_BLOOM_MODULES = ("transformers.models.bloom.modeling_bloom",)


def serves(cls) -> bool:
    """Whether attention modules of class ``cls`` are BLOOM's."""
    return defining_module(cls, "BloomAttention", _BLOOM_MODULES) is not None


def _output_projection(module, context_layer: Tensor) -> Tensor:
    """``dense``, or the sum of its ``pretraining_tp`` column slices (and no bias) as the module computes it with
    ``slow_but_exact``."""
    if module.pretraining_tp > 1 and module.slow_but_exact:
        slices = module.hidden_size / module.pretraining_tp
        output = torch.zeros_like(context_layer)
        for i in range(module.pretraining_tp):
            columns = slice(int(i * slices), int((i + 1) * slices))
            output = output + F.linear(context_layer[:, :, columns], module.dense.weight[:, columns])
        return output  # without dense's bias, as the module's sliced projection
    return module.dense(context_layer)


class BloomPrefixForward(PrefixForward):
    """The forward of a bound BLOOM attention: its attention with the prefix of its bank slot in front of the keys
    and values (see the module docstring). Takes the module's forward arguments and returns ``(output, None)``:
    no attention weights."""

    def __call__(self, hidden_states: Tensor, residual: Tensor, alibi: Tensor, attention_mask, layer_past=None,
                 use_cache=False, output_attentions=False, **kwargs):
        module = self.module
        family = importlib.import_module(defining_module(type(module), "BloomAttention", _BLOOM_MODULES))
        query, key, value = module._reshape(module.query_key_value(hidden_states))
        if layer_past is not None:
            key, value = layer_past.update(key, value, module.layer_idx)
        batch, heads = query.shape[:2]
        key_padding_mask, mask, causal = op_masks(attention_mask, key.shape[-2], causal=True)
        context = unpacked_context(module, kwargs, "BLOOM", "its ALiBi positions and causal mask would span them")
        prefix_k, prefix_v, index, lengths, backend = _module_prefix(module, query, key, kwargs, context)
        # the module adds beta · alibi to inv_norm_factor · q·k (beta is 1)
        bias = alibi.view(batch, heads, 1, -1)[..., :key.shape[-2]] * module.beta
        slopes = alibi_slopes(family.build_alibi_tensor, heads, query.device)
        prefix_bias = alibi_prefix_bias(module, slopes, module.beta, prefix_k, index, lengths, context, batch)
        out = prefix_attention(query, key, value, prefix_k, prefix_v, prefix_index=index, prefix_lengths=lengths,
                               key_padding_mask=key_padding_mask, attn_mask=mask, attn_bias=bias, causal=causal,
                               scale=module.inv_norm_factor,
                               dropout_p=module.attention_dropout.p if module.training else 0.0, backend=backend,
                               prefix_bias=prefix_bias)
        output = _output_projection(module, merge_heads(out))
        return family.dropout_add(output, residual, module.hidden_dropout, module.training), None


install = BloomPrefixForward.install
uninstall = BloomPrefixForward.uninstall
