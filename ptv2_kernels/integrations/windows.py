"""Sliding-window layers of a patched model (Mistral, Qwen2/3, Gemma2/3, Cohere2, GPT-OSS, ModernBERT, ...): the
op's ``window_size`` instead of a dense ``[B, 1, Nq, Nk]`` mask, and, for a bank placed where a cache would hold
it (``position_bias="cached"``), the prefix slots that slide out of the window.

transformers builds a sliding layer's mask from a mask function: ``sliding_window_causal_mask_function(W)`` (key
``k`` visible to query ``q`` when ``q - W < k <= q``, positions counted along the cache) or
``sliding_window_bidirectional_mask_function(W)`` (when ``|q - k| <= W``). :func:`mask_window` recognizes exactly
those two (a mask function composed with anything else, a user's extra mask for example, is not recognized, and
that layer keeps its dense mask). The mask function then hands the op the key-padding form, in the dtype
:data:`WINDOWED_PADDING_DTYPE` that marks it as a sliding layer's, and records the window on the forward's
context; the attention turns the mark into ``window_size``. The window comes from the mask, not from the
``sliding_window`` argument the families pass their attention (whose convention differs between families).

The prefix keys are not in the cache of a patched model, so by default no window hides them: every query sees its
task's prefix, as P-Tuning v2 means it. PEFT's prefix sits in the cache in front of the sequence, at positions
``0..L-1``, and a query at cache position ``L + t`` (``t`` tokens before it) loses slot ``s`` once
``L + t - s >= W``. A bank with ``position_bias="cached"`` (what ``PrefixBank.from_peft`` sets) reproduces that:
:func:`cached_prefix_window_bias` gives the op a ``-inf`` ``prefix_bias`` on those slots.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

# The dtype that marks a mask function's key-padding form as a sliding layer's: [B, 1, Nk] (causal) or [B, Nk]
# (bidirectional) bool is a full-attention layer's, the same in uint8 a sliding layer's.
WINDOWED_PADDING_DTYPE = torch.uint8

_CODES: dict = {}


def _codes(masking_utils) -> dict:
    """The code objects of the closures that this transformers' mask-function factories return."""
    if not _CODES:
        def code(factory, *args):
            return getattr(factory(*args), "__code__", None) if factory is not None else None

        causal = masking_utils.causal_mask_function
        _CODES["and"] = code(masking_utils.and_masks, causal, causal)
        _CODES["causal"] = code(getattr(masking_utils, "sliding_window_overlay", None), 1)
        _CODES["bidirectional"] = code(getattr(masking_utils, "sliding_window_bidirectional_overlay", None), 1)
    return _CODES


def _closure(function) -> dict:
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None) or ()
    if code is None or len(code.co_freevars) != len(cells):
        return {}
    try:
        return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}
    except ValueError:  # an empty cell
        return {}


def mask_window(masking_utils, mask_function) -> Optional[tuple[bool, tuple[int, int]]]:
    """``(causal, (left, right))`` when ``mask_function`` is one of transformers' two sliding-window mask
    functions itself (its overlay and the causal or bidirectional mask function, nothing else), else None:
    ``(True, (W - 1, 0))`` for ``sliding_window_causal_mask_function(W)``, ``(False, (W, W))`` for
    ``sliding_window_bidirectional_mask_function(W)``."""
    codes = _codes(masking_utils)
    if mask_function is None or codes["and"] is None or getattr(mask_function, "__code__", None) is not codes["and"]:
        return None
    parts = _closure(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2:
        return None
    for causal, base in ((True, masking_utils.causal_mask_function),
                         (False, masking_utils.bidirectional_mask_function)):
        if base not in parts:
            continue
        overlay = parts[0] if parts[1] is base else parts[1]
        overlay_code = codes["causal" if causal else "bidirectional"]
        if overlay_code is None or getattr(overlay, "__code__", None) is not overlay_code:
            return None
        window = _closure(overlay).get("sliding_window")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            return None
        return causal, ((window - 1, 0) if causal else (window, window))
    return None


def layer_window(module, kwargs) -> Optional[int]:
    """The ``sliding_window`` a layer's attention call names (transformers passes it to the attention function,
    None for full-attention layers; the modules of most families keep it as well), for the calls whose mask does
    not carry the window: packed rows, which have no mask, and dense masks. Its convention is transformers' flash
    attention's: ``W`` reaches ``W - 1`` keys back (and forward, bidirectional)."""
    window = kwargs.get("sliding_window")
    if window is None:
        window = getattr(module, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        return None
    return window


def windowed_padding(padding: Optional[Tensor], batch: int, kv_length: int, device, causal: bool) -> Tensor:
    """The key-padding form of a sliding layer's mask: ``padding`` ``[B, Nk]`` bool (None: every key is real) in
    the marking dtype, ``[B, 1, Nk]`` when causal."""
    if padding is None:
        padding = torch.ones(batch, kv_length, dtype=WINDOWED_PADDING_DTYPE, device=device)
    else:
        padding = padding.to(WINDOWED_PADDING_DTYPE)
    return padding.unsqueeze(1) if causal else padding


def cached_prefix_window_bias(left: int, query_positions: Tensor, prefix_len: int,
                              lengths: Union[int, Tensor]) -> Tensor:
    """The ``prefix_bias`` that hides the prefix slots that a cache holding the prefix in front of the sequence
    would slide out of a causal window reaching ``left`` keys back (``W - 1``).

    ``query_positions`` ``[Nq]``: each query's count of tokens before it in the sequence (its cache position
    without the prefix); ``lengths``: each sample's prefix length (an int for all, or ``[B]``). Slot ``s`` of a
    sample with ``L`` keys is hidden from a query at ``t`` when ``L + t - s > left``. Returns ``[1 or B, 1, Nq, P]``
    of 0 and -inf, float32."""
    slots = torch.arange(prefix_len, device=query_positions.device)
    if isinstance(lengths, Tensor):
        lengths = lengths.to(device=query_positions.device, dtype=torch.long).view(-1, 1, 1)
        distance = lengths + query_positions.view(1, -1, 1) - slots.view(1, 1, -1)
    else:
        distance = (lengths + query_positions.view(-1, 1) - slots.view(1, -1)).unsqueeze(0)
    bias = torch.zeros(distance.shape, device=query_positions.device, dtype=torch.float32)
    return bias.masked_fill_(distance > left, float("-inf")).unsqueeze(1)
