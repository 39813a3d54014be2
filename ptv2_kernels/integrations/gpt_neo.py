"""P-Tuning v2 on GPT-Neo: the family adapter.

GPT-Neo's ``GPTNeoSelfAttention`` computes its scores itself instead of going through transformers'
AttentionInterface, so :func:`~ptv2_kernels.integrations.hf_transformers.patch` replaces the ``forward`` of every
bound module, on the instance, by a :class:`GPTNeoPrefixForward`, and ``unpatch`` removes it. Its layers pass no
keyword arguments down: the context of the running forward comes from the patch state.

The forward computes what the module computes around its attention: the query/key/value projections, the head
split, the cache update through the module's own cache object (``layer_past.update``, so the cache holds real tokens
only), the output projection and its dropout. The attention itself is :func:`~ptv2_kernels.prefix_attention` over
the slot's prefix followed by the sequence keys, with GPT-Neo's semantics:

* **unscaled scores**: ``scale=1.0`` (GPT-Neo never divides by ``sqrt(D)``, for the prefix keys neither);
* **float32 scores and softmax**: GPT-Neo upcasts q and k before the product; the op keeps its scores, softmax
  statistics and accumulators in float32 for every input dtype, so q, k and v reach it in the module's dtype;
* **local layers** (``attention_types`` ``"local"``): the module's sliding-window buffer (``bias``, the last ``Nq``
  rows of its first ``Nk`` columns) masks the sequence keys; the prefix stays visible to every query, as sliding
  windows never hide the prefix in a patched model (a prefix placed in the cache, as PEFT places it, slides out of
  the window once a query is ``window_size - P`` tokens in);
* **global layers**: causal over the sequence keys, aligned bottom-right as the module's buffer is;
* the model's mask (eager: additive float) reaches the sequence keys as the module adds it; attention dropout
  drops prefix and sequence columns alike.

With ``positions="shifted"`` (patch's default) the learned positions (``wpe``) of the real tokens start after the
prefix, as when the prefix sits in the cache. Packed (padding-free) batches are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import prefix_attention
from .adapters import PrefixForward, defining_module, merge_heads, op_masks, split_heads, unpacked_context
from .hf_transformers import _module_prefix

__all__ = ["serves", "install", "uninstall", "GPTNeoPrefixForward"]

_DEFINING_MODULES = ("transformers.models.gpt_neo.modeling_gpt_neo",)
_CLASS_NAME = "GPTNeoSelfAttention"


def serves(cls) -> bool:
    """Whether attention modules of class ``cls`` are GPT-Neo's self-attention (or its flash-attention variant)."""
    return defining_module(cls, _CLASS_NAME, _DEFINING_MODULES) is not None


def _local_window(module, mask, query_length: int, key_length: int):
    """The model's mask with the local layer's window on the sequence keys: ``[.., Nq, Nk]``."""
    window = module.bias[:, :, key_length - query_length:key_length, :key_length]
    if mask is None:
        return window
    if mask.dtype == torch.bool:
        return mask & window
    return mask.masked_fill(~window, torch.finfo(mask.dtype).min)


class GPTNeoPrefixForward(PrefixForward):
    """The forward of a bound GPT-Neo self-attention: its attention with the prefix of its bank slot in front of
    the keys and values (see the module docstring). Takes the module's forward arguments and returns
    ``(output, None)``: no attention weights."""

    def __call__(self, hidden_states: Tensor, attention_mask=None, layer_past=None, use_cache=False,
                 output_attentions=False, **kwargs):
        module = self.module
        heads = module.num_heads
        query, key, value = (split_heads(proj(hidden_states), heads)
                             for proj in (module.q_proj, module.k_proj, module.v_proj))
        if layer_past is not None:
            key, value = layer_past.update(key, value, module.layer_id)
        key_length = key.shape[-2]
        key_padding_mask, mask, causal = op_masks(attention_mask, key_length, causal=True)
        if module.attention_type == "local":
            mask, causal = _local_window(module, mask, query.shape[-2], key_length), False
        context = unpacked_context(module, kwargs, "GPT-Neo", "its causal mask would span them")
        prefix_k, prefix_v, index, lengths, backend = _module_prefix(module, query, key, kwargs, context)
        out = prefix_attention(query, key, value, prefix_k, prefix_v, prefix_index=index, prefix_lengths=lengths,
                               key_padding_mask=key_padding_mask, attn_mask=mask, causal=causal, scale=1.0,
                               dropout_p=module.attn_dropout.p if module.training else 0.0, backend=backend)
        return module.resid_dropout(module.out_proj(merge_heads(out))), None


install = GPTNeoPrefixForward.install
uninstall = GPTNeoPrefixForward.uninstall
