"""P-Tuning v2 on DeBERTa and DeBERTa-v2 (DeBERTa-v3 checkpoints load as DeBERTa-v2): the family adapter.

Their ``DisentangledSelfAttention`` computes its scores itself instead of going through transformers'
AttentionInterface, so :func:`~ptv2_kernels.integrations.hf_transformers.patch` replaces the ``forward`` of every
bound attention module, on the instance, by a :class:`DisentangledPrefixForward` (a module-level class, so that the
model deep-copies and pickles), and :func:`~ptv2_kernels.integrations.hf_transformers.unpatch` removes it. The module
finds its bank slot, the samples' tasks and the backend as every patched attention does (``_module_context``,
``_module_prefix``); its layers pass no keyword arguments down, so the context of the running forward comes from
the patch state. Packed (padding-free) batches are refused.

The forward computes the query/key/value projections as the module does, and the disentangled relative-position
terms (content→position and position→content) with the module's own method, on the sequence keys only; these
reach :func:`~ptv2_kernels.prefix_attention` as ``attn_bias``, the model's mask as a boolean ``attn_mask``. The
prefix is never concatenated.

The semantics are those of the official P-Tuning v2 code (THUDM/P-tuning-v2, ``model/deberta.py`` and
``model/debertaV2.py``), which concatenates each layer's prefix in front of the keys and values:

* **one scale for every key**: the scores are ``q·k / sqrt(D * scale_factor)``, ``scale_factor`` being 1 plus the
  number of relative terms, for the prefix keys as for the sequence keys (the official code divides the query, or
  the scores, by that one scale before or after the product with the concatenated keys);
* **relative terms between real tokens only**: the c2p/p2c terms are computed from the sequence keys and the
  relative positions of the real tokens (from 0, not shifted by the prefix); the prefix columns get zero (the
  official code adds a block of zeros in front of the terms);
* **the prefix is visible** to every query that sees any key (the official code prepends ones to the padding
  mask); a query whose mask row hides every key, a padding token, outputs zeros (the official masked softmax,
  ``XSoftmax``, zeroes a fully masked row);
* attention dropout drops prefix and sequence columns alike.

With ``positions="shifted"`` (patch's default) the absolute positions of the real tokens start after the prefix,
as the official embeddings number them (``position_ids[P : P + N]``); that matters only with
``position_biased_input``.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..ops import prefix_attention
from .adapters import PrefixForward, defining_module, split_heads, unpacked_context
from .hf_transformers import _module_prefix

__all__ = ["serves", "install", "uninstall", "DisentangledPrefixForward"]

# The modules defining the attention classes served here, and whether the class is DeBERTa-v2's.
_DEFINING_MODULES = {"transformers.models.deberta.modeling_deberta": False,
                     "transformers.models.deberta_v2.modeling_deberta_v2": True}
_CLASS_NAME = "DisentangledSelfAttention"


def _is_v2(cls):
    """True for DeBERTa-v2's attention (or a subclass), False for DeBERTa's, None for anything else."""
    return _DEFINING_MODULES.get(defining_module(cls, _CLASS_NAME, _DEFINING_MODULES))


def serves(cls) -> bool:
    """Whether attention modules of class ``cls`` are DeBERTa's or DeBERTa-v2's disentangled attention."""
    return _is_v2(cls) is not None


def _projections(module, hidden_states: Tensor, v2: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The module's query, key and value, each ``[B, H, N, D]``, computed as the module computes them."""
    heads = module.num_attention_heads
    if v2:
        return tuple(split_heads(proj(hidden_states), heads)
                     for proj in (module.query_proj, module.key_proj, module.value_proj))
    # DeBERTa's one projection holds each head's query, key and value side by side; q and v have a bias of their own.
    query, key, value = module.transpose_for_scores(module.in_proj(hidden_states)).chunk(3, dim=-1)
    query = query + module.transpose_for_scores(module.q_bias[None, None, :])
    value = value + module.transpose_for_scores(module.v_bias[None, None, :])
    return query, key, value


def _scale_factor(module, v2: bool) -> int:
    """1 plus the number of relative terms, counted as the module counts them."""
    kinds = module.pos_att_type
    return 1 + ("c2p" in kinds) + ("p2c" in kinds) if v2 else 1 + len(kinds)


def _relative_terms(module, query, key, relative_pos, rel_embeddings, scale_factor: int, scale: float, v2: bool):
    """The c2p/p2c terms ``[B, H, N, N]`` on the sequence keys from the module's own method, or None."""
    if not module.relative_attention or (not v2 and (rel_embeddings is None or relative_pos is None)):
        return None
    rel_embeddings = module.pos_dropout(rel_embeddings)
    if v2:  # its method takes [B * H, N, D] and the unscaled query, and scales each term itself
        batch, heads, length, dim = query.shape
        terms = module.disentangled_attention_bias(query.reshape(batch * heads, length, dim),
                                                   key.reshape(batch * heads, length, dim), relative_pos,
                                                   rel_embeddings, scale_factor)
        return terms.view(batch, heads, length, -1) if isinstance(terms, Tensor) else None
    # DeBERTa's takes the query already scaled, as its forward computes it.
    terms = module.disentangled_att_bias(query * scale, key, relative_pos, rel_embeddings, scale_factor)
    return terms if isinstance(terms, Tensor) else None


class DisentangledPrefixForward(PrefixForward):
    """The forward of a bound DeBERTa / DeBERTa-v2 attention module: its disentangled attention with the prefix of
    its bank slot in front of the keys and values (see the module docstring for the exact semantics). Takes the
    arguments of the module's own forward and returns ``(context, None)``: no attention weights."""

    def __call__(self, hidden_states: Tensor, attention_mask: Tensor, output_attentions: bool = False,
                 query_states=None, relative_pos=None, rel_embeddings=None):
        module = self.module
        if query_states is not None:
            raise NotImplementedError("a patched DeBERTa attention does not take query_states (the enhanced mask "
                                      "decoder's extra steps)")
        if getattr(module, "talking_head", False):
            raise NotImplementedError("a patched DeBERTa attention does not support talking_head (it mixes the "
                                      "heads' scores, prefix columns included, before the softmax)")
        if attention_mask.dim() != 4:
            raise ValueError(f"a patched DeBERTa attention expects the encoder's 4-D mask, got shape "
                             f"{list(attention_mask.shape)}")
        v2 = _is_v2(type(module))
        query, key, value = _projections(module, hidden_states, v2)
        scale_factor = _scale_factor(module, v2)
        scale = 1.0 / math.sqrt(query.shape[-1] * scale_factor)
        terms = _relative_terms(module, query, key, relative_pos, rel_embeddings, scale_factor, scale, v2)
        context = unpacked_context(module, {}, "DeBERTa", "its relative positions would span them")
        mask = attention_mask.bool()
        prefix_k, prefix_v, index, lengths, backend = _module_prefix(module, query, key, {}, context)
        out = prefix_attention(query, key, value, prefix_k, prefix_v, prefix_index=index, prefix_lengths=lengths,
                               attn_mask=mask, attn_bias=terms, scale=scale,
                               dropout_p=module.dropout.p if module.training else 0.0, backend=backend)
        # [B, N, H, D]; a query whose row hides every key (padding) outputs zeros, as the official masked softmax.
        out = out.transpose(1, 2)
        out = out.masked_fill(~mask.any(-1).transpose(1, 2).unsqueeze(-1), 0.0)
        return out.reshape(*out.shape[:2], -1), None


install = DisentangledPrefixForward.install
uninstall = DisentangledPrefixForward.uninstall
