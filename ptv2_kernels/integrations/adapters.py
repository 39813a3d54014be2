"""What the family adapters share (``deberta.py``, ``gpt_neo.py``, ``mpnet.py``, ``falcon.py``, ``bloom.py``,
``xglm.py``, ``mpt.py``).

A family adapter serves attention modules whose forward does not go through transformers' AttentionInterface: it
replaces the ``forward`` of each bound module, on the instance, by an instance of a module-level
:class:`PrefixForward` subclass (so that the model deep-copies and pickles), which calls
:func:`~ptv2_kernels.prefix_attention` with the module's bank slot. The pieces here: which classes an adapter
serves, installing and removing its forward, the head split and merge around the op, the context of the running
forward, the masks a family's model hands its attention in the op's forms, and ALiBi's bias on the prefix keys.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .hf_transformers import _module_context, sample_prefix_lengths

__all__ = ["defining_module", "PrefixForward", "split_heads", "merge_heads", "unpacked_context", "op_masks",
           "alibi_slopes", "alibi_prefix_bias"]


def defining_module(cls, class_name: str, modules) -> Optional[str]:
    """The module, one of ``modules``, that defines the first class named ``class_name`` in ``cls``'s MRO, or None.

    An adapter serves transformers' own class and its subclasses (the flash-attention variants share the weights
    and differ only in their forward, which the adapter replaces), and no other class of that name."""
    for klass in getattr(cls, "__mro__", ()):
        if klass.__name__ == class_name and klass.__module__ in modules:
            return klass.__module__
    return None


class PrefixForward:
    """Base of an adapter's forward: set on a bound attention module's instance (:meth:`install`), it holds the
    module and is called with the module's forward arguments."""

    def __init__(self, module):
        self.module = module

    @classmethod
    def install(cls, module) -> None:
        """Make the bound ``module`` attend over its bank slot (its forward, replaced on the instance)."""
        module.forward = cls(module)

    @classmethod
    def uninstall(cls, module) -> None:
        """Give ``module`` its class's forward back."""
        if isinstance(module.__dict__.get("forward"), cls):
            del module.__dict__["forward"]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, N, H * D]`` as ``[B, H, N, D]``, a view."""
    batch, length = x.shape[:2]
    return x.view(batch, length, heads, -1).transpose(1, 2)


def merge_heads(out: Tensor) -> Tensor:
    """The op's output ``[B, H, N, D]`` (laid out as ``[B, N, H, D]``) as ``[B, N, H * D]``, a view."""
    return out.transpose(1, 2).flatten(2)


def unpacked_context(module, kwargs, family: str, why: str):
    """The context of the forward running now (see ``_module_context``), refusing a packed (padding-free) batch:
    the family's model makes its mask (or positions) over the packed row, which would span its sequences."""
    context = _module_context(module, kwargs)
    if context is not None and context.packing is not None:
        raise NotImplementedError(f"a patched {family} does not serve packed sequences ({why}): pass a padded batch "
                                  "with an attention mask")
    return context


def op_masks(attention_mask: Optional[Tensor], key_length: int, causal: bool):
    """The op's ``(key_padding_mask, attn_mask, causal)`` for the mask a family's model hands its attention.

    * None: no mask; causality from the module (``causal``), aligned bottom-right as a growing cache needs.
    * ``[B, Nk]``: the padding mask of the flash-attention implementations, causality from the module.
    * 4-D: the eager (additive float: 0 or very negative) or SDPA (bool) mask, causality included; passed on as it
      is (a float mask adds to the sequence keys' scores, as the module adds it), cut to the keys (a static cache's
      mask may be longer) and integer masks read as bool.

    Masks reach the sequence keys only: the prefix stays visible to every query.
    """
    if attention_mask is None:
        return None, None, causal
    if attention_mask.dim() == 2:
        return attention_mask[:, :key_length].to(torch.bool), None, causal
    if attention_mask.dim() != 4:
        raise ValueError(f"a patched attention expects a 2-D or 4-D attention mask, got shape "
                         f"{list(attention_mask.shape)}")
    mask = attention_mask[..., :key_length]
    if mask.dtype != torch.bool and not mask.is_floating_point():
        mask = mask != 0
    return None, mask, False


_SLOPES: dict = {}


def alibi_slopes(build_alibi_tensor: Callable, num_heads: int, device) -> Tensor:
    """Each head's ALiBi slope ``[H]`` (float32), read from the family's own ``build_alibi_tensor``: its bias of
    position 1 of a mask of ones (position 0 gets 0). Made once per family, head count and device."""
    key = (build_alibi_tensor, num_heads, torch.device(device))
    if key not in _SLOPES:
        ones = torch.ones(1, 2, dtype=torch.long, device=device)
        _SLOPES[key] = build_alibi_tensor(ones, num_heads, dtype=torch.float32).view(num_heads, 2)[:, 1]
    return _SLOPES[key]


def alibi_prefix_bias(module, slopes: Tensor, factor: float, prefix_k: Tensor, index, lengths, context,
                      batch: int) -> Optional[Tensor]:
    """ALiBi on the prefix keys of a bank with ``position_bias="cached"``, as the op's ``prefix_bias``
    ``[1 | B, H, 1, P]``; None for a bank with ``"none"`` (the prefix keys unbiased) or an empty prefix.

    The family's ALiBi biases a key by ``slope · position`` (``factor`` scales it as the family does), positions
    counted over the real tokens of its mask; a cache holding the prefix gives slot ``s`` position ``s`` and the
    real tokens ``L + rank``. The softmax ignores a bias shared by a whole row, so the sequence keys keep the bias
    of ``rank`` that the model computes without the prefix, and slot ``s`` gets ``slope · (s - L)``."""
    prefix_len = prefix_k.shape[-2]
    if prefix_len == 0 or context is None or context.state.bank.position_bias != "cached":
        return None
    slots = torch.arange(prefix_len, device=slopes.device, dtype=torch.float32)
    sample_lengths = sample_prefix_lengths(context, index, lengths, batch)
    if isinstance(sample_lengths, Tensor):
        positions = slots[None, :] - sample_lengths.to(device=slopes.device, dtype=torch.float32)[:, None]
    else:
        positions = (slots - sample_lengths)[None, :]
    return (slopes[None, :, None] * positions[:, None, :] * factor)[:, :, None, :]
