"""P-Tuning v2 on XGLM: the family adapter.

XGLM's ``XGLMAttention`` computes its scores itself instead of going through transformers' AttentionInterface,
so :func:`~ptv2_kernels.integrations.hf_transformers.patch` replaces the ``forward`` of every bound module, on the
instance, by an :class:`XGLMPrefixForward`, and ``unpatch`` removes it.

The forward computes what the module computes around its attention: the query/key/value projections, the head
split, the cache update through the model's own cache object (real tokens only), and the output projection. The
attention is :func:`~ptv2_kernels.prefix_attention` over the slot's prefix followed by the sequence keys:

* scores ``q·k · scaling`` (XGLM scales the queries by ``head_dim ** -0.5``) for prefix and sequence keys alike;
* the model's mask (eager: additive float, causality and padding included) reaches the sequence keys as the
  module adds it; every query sees the prefix; attention dropout drops prefix and sequence columns alike.

XGLM numbers its sinusoidal positions from the cache's length, so with ``positions="shifted"`` (patch's default)
the real tokens sit after the prefix, as when the prefix is in the cache. A decoder-only XGLM configured with
cross-attention (``add_cross_attention``) keeps its cross-attention unpatched (no prefix there), as for the
other decoder-only families. Packed (padding-free) batches are refused.
"""

from __future__ import annotations

from torch import Tensor

from ..ops import prefix_attention
from .adapters import PrefixForward, defining_module, merge_heads, op_masks, split_heads, unpacked_context
from .hf_transformers import _module_prefix

__all__ = ["serves", "install", "uninstall", "XGLMPrefixForward"]

_DEFINING_MODULES = ("transformers.models.xglm.modeling_xglm",)
_CLASS_NAME = "XGLMAttention"


def serves(cls) -> bool:
    """Whether attention modules of class ``cls`` are XGLM's attention."""
    return defining_module(cls, _CLASS_NAME, _DEFINING_MODULES) is not None


class XGLMPrefixForward(PrefixForward):
    """The forward of a bound XGLM self-attention: its attention with the prefix of its bank slot in front of the
    keys and values (see the module docstring). Takes the module's forward arguments (the cache as ``cache``, or
    ``past_key_values`` before transformers 5.24) and returns ``(output, None)``: no attention weights."""

    def __call__(self, hidden_states: Tensor, key_value_states=None, cache=None, attention_mask=None,
                 past_key_values=None, **kwargs):
        module = self.module
        if key_value_states is not None:  # never bound (see the module docstring): a cross-attention has no slot
            raise NotImplementedError("a patched XGLM attention got key_value_states: its cross-attention is not "
                                      "bound to a bank slot")
        cache = cache if cache is not None else past_key_values
        heads = module.num_heads
        query, key, value = (split_heads(proj(hidden_states), heads)
                             for proj in (module.q_proj, module.k_proj, module.v_proj))
        if cache is not None:
            layers = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache's self-attention part
            key, value = layers.update(key, value, module.layer_idx)
        key_padding_mask, mask, causal = op_masks(attention_mask, key.shape[-2], causal=True)
        context = unpacked_context(module, kwargs, "XGLM", "its causal mask would span them")
        prefix_k, prefix_v, index, lengths, backend = _module_prefix(module, query, key, kwargs, context)
        out = prefix_attention(query, key, value, prefix_k, prefix_v, prefix_index=index, prefix_lengths=lengths,
                               key_padding_mask=key_padding_mask, attn_mask=mask, causal=causal,
                               scale=module.scaling, dropout_p=module.dropout if module.training else 0.0,
                               backend=backend)
        return module.out_proj(merge_heads(out)), None


install = XGLMPrefixForward.install
uninstall = XGLMPrefixForward.uninstall
