"""P-Tuning v2 on Falcon (its rotary and ALiBi configurations): the family adapter (BLOOM's is ``bloom.py``).

Before transformers 5.25, Falcon's ``FalconAttention`` computes its attention itself instead of going through
transformers' AttentionInterface (from 5.25 on it goes through it, and this adapter serves nothing: the model is
patched as every such family is, and an ALiBi configuration, whose ALiBi the model then folds into the sequence
keys' mask, is refused at patch), so :func:`~ptv2_kernels.integrations.hf_transformers.patch` replaces the ``forward`` of every
bound module, on the instance, by a :class:`FalconPrefixForward`, and ``unpatch`` removes it. Its layers pass no
keyword arguments down: the context of the running forward comes from the patch state.

The forward computes what the module computes around its attention: the fused query/key/value projection split in
the layout of the configuration, the rotary embedding of queries and keys (``alibi=False``: the family's own
``apply_rotary_pos_emb`` with the model's cos/sin), the cache update through the module's own cache object
(``layer_past.update``, real tokens only) and the output projection (``dense``). The attention is
:func:`~ptv2_kernels.prefix_attention` over the slot's prefix followed by the sequence keys, scaled by
``1/sqrt(D)``, causal over the sequence keys (bottom-right, as a growing cache needs), the model's mask (SDPA: bool,
eager: additive float) on the sequence keys, no attention dropout (Falcon's rotary attention has none). The
prefix is never rotated: its keys have no position, as when they sit in a cache.

With ``alibi=True`` the model folds ALiBi into its 4-D float mask (``alibi / sqrt(D)`` on the visible keys); its
eager attention adds ``alibi · inv_norm_factor`` to the scores besides (so eager Falcon counts ALiBi twice, and the
adapter does as it does), and attention dropout applies in training. The prefix keys get ALiBi as a cache holding
them would give it when the bank's ``position_bias`` is ``"cached"`` (:func:`~.adapters.alibi_prefix_bias`), none
with ``"none"``.

The fused layouts, per token:

* ``new_decoder_architecture`` (Falcon-40B/180B): for each of the ``num_kv_heads`` groups, its query heads, then
  one key and one value. The module broadcasts the group's key and value to its query heads before attending and
  caching; here they reach the op (and the cache) once per group, as GQA: query head ``h`` reads key/value head
  ``h // (num_heads / num_kv_heads)``, the grouping the broadcast makes. The bank's slots have ``num_kv_heads``
  heads;
* ``multi_query`` (Falcon-7B): all query heads, then one key and one value head shared by all (slots of 1 head);
* neither: each head's query, key and value side by side (slots of ``num_heads`` heads).

Packed (padding-free) batches are refused.
"""

from __future__ import annotations

import importlib
import math
from typing import Optional

from torch import Tensor

from ..ops import prefix_attention
from .adapters import (PrefixForward, alibi_prefix_bias, alibi_slopes, defining_module, merge_heads, op_masks,
                       unpacked_context)
from .hf_transformers import _module_prefix

__all__ = ["serves", "install", "uninstall", "FalconPrefixForward"]

_FALCON_MODULES = ("transformers.models.falcon.modeling_falcon",)


def _falcon_module(cls) -> Optional[str]:
    return defining_module(cls, "FalconAttention", _FALCON_MODULES)


def serves(cls) -> bool:
    """Whether attention modules of class ``cls`` are Falcon's (or its flash-attention variant) computing their
    attention themselves. From transformers 5.25 on Falcon's attention goes through AttentionInterface and is served
    as every such family is (its ALiBi configuration is then refused: see ``hf_transformers``)."""
    from .hf_transformers import _calls_attention_interface

    return _falcon_module(cls) is not None and not _calls_attention_interface(cls)


def _split(module, fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The fused projection's query ``[B, H, N, D]`` and key/value ``[B, Hkv, N, D]`` (views)."""
    if module.new_decoder_architecture:
        batch, length, _ = fused.shape
        groups = module.num_kv_heads
        qkv = fused.view(batch, length, groups, module.num_heads // groups + 2, module.head_dim)
        query = qkv[:, :, :, :-2].reshape(batch, length, module.num_heads, module.head_dim)
        key, value = qkv[:, :, :, -2], qkv[:, :, :, -1]
    else:  # multi-query or one key/value per head: the module's own split, [B, N, heads, D] each
        query, key, value = module._split_heads(fused)
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


class FalconPrefixForward(PrefixForward):
    """The forward of a bound Falcon attention (rotary): its attention with the prefix of its bank slot in front of
    the keys and values (see the module docstring). Takes the module's forward arguments and returns
    ``(output, None)``: no attention weights."""

    def __call__(self, hidden_states: Tensor, alibi, attention_mask, position_ids=None, layer_past=None,
                 use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
        module = self.module
        query, key, value = _split(module, module.query_key_value(hidden_states))
        family = importlib.import_module(_falcon_module(type(module)))
        if alibi is None:
            cos, sin = position_embeddings
            query, key = family.apply_rotary_pos_emb(query, key, cos, sin)
        if layer_past is not None:
            key, value = layer_past.update(key, value, module.layer_idx)
        context = unpacked_context(module, kwargs, "Falcon", "its causal mask would span them")
        prefix_k, prefix_v, index, lengths, backend = _module_prefix(module, query, key, kwargs, context)
        scale = 1.0 / math.sqrt(module.head_dim)
        if alibi is None:
            key_padding_mask, mask, causal = op_masks(attention_mask, key.shape[-2], causal=True)
            out = prefix_attention(query, key, value, prefix_k, prefix_v, prefix_index=index,
                                   prefix_lengths=lengths, key_padding_mask=key_padding_mask, attn_mask=mask,
                                   causal=causal, scale=scale, backend=backend)
            return module.dense(merge_heads(out)), None
        if attention_mask is None or attention_mask.dim() != 4 or not attention_mask.is_floating_point():
            raise NotImplementedError("a patched Falcon with ALiBi expects the model's 4-D float mask, which carries "
                                      "the ALiBi bias (its eager and SDPA attention implementations make one)")
        eager = module.config._attn_implementation != "sdpa"
        batch, heads = query.shape[:2]
        # eager Falcon adds alibi · inv_norm_factor to the scores as well as the mask's alibi / sqrt(D)
        bias = alibi.view(batch, heads, 1, -1)[..., :key.shape[-2]] * module.inv_norm_factor if eager else None
        slopes = alibi_slopes(family.build_alibi_tensor, heads, query.device)
        prefix_bias = alibi_prefix_bias(module, slopes, scale * (2.0 if eager else 1.0), prefix_k, index, lengths,
                                        context, batch)
        out = prefix_attention(query, key, value, prefix_k, prefix_v, prefix_index=index, prefix_lengths=lengths,
                               attn_mask=attention_mask[..., :key.shape[-2]], attn_bias=bias, causal=False,
                               scale=scale, dropout_p=module.attention_dropout.p if module.training else 0.0,
                               backend=backend, prefix_bias=prefix_bias)
        return module.dense(merge_heads(out)), None


install = FalconPrefixForward.install
uninstall = FalconPrefixForward.uninstall
