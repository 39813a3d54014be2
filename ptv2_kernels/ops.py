"""The op: ``prefix_attention`` — argument checks, backend choice, autograd and ``torch.library`` registration.

The public function checks and normalizes its arguments (a 3-D prefix becomes a bank of one, a mask becomes a
key-padding mask or a dense mask viewed as ``[B, Hq, Nq, Nk]``), picks a backend and calls the custom op
``ptv2_kernels::prefix_attention``. That op and its backward are opaque ``torch.library`` custom ops with fake
implementations, so ``torch.compile(fullgraph=True)`` traces through them without a graph break. In eager mode the
same forward and backward run through a plain ``autograd.Function`` instead, which skips the dispatcher's
per-call cost; both paths share their bodies and autograd rule.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Optional, Union

import torch
from torch import Tensor

from . import backends, native
from ._memo import Memo
from .call import Call

__all__ = ["prefix_attention", "BACKENDS"]

BACKENDS = ("auto",) + backends.NAMES


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    prefix_index: Optional[Tensor] = None,
    prefix_lengths: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
    deterministic: Optional[bool] = None,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
    prefix_bias: Optional[Tensor] = None,
    window_size: Optional[tuple[int, int]] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention of ``q`` over a per-layer prefix followed by the sequence's own keys/values, without concatenating.

    Args:
        q: ``[B, Hq, Nq, Dk]`` queries; any strides with the last dim contiguous.
        k, v: ``[B, Hkv, Nk, Dk]`` sequence keys and ``[B, Hkv, Nk, Dv]`` values; ``Hq % Hkv == 0`` (GQA/MQA
            without repeating K/V). The values' head dim Dv may differ from the keys' Dk (multi-head latent
            attention, DeepSeek-V2/V3); the ``triton`` and ``reference`` backends serve that.
        prefix_k, prefix_v: ``[T, Hkv, P, Dk]`` and ``[T, Hkv, P, Dv]`` bank of T prefixes, or ``[Hkv, P, Dk]`` and
            ``[Hkv, P, Dv]`` for a single one; any strides; their dtype may differ from q's (converted on load,
            gradient returned in their own dtype).
        prefix_index: ``[B]`` integer tensor, entries in ``[0, T)``: the bank entry of each sample. None needs T = 1.
        prefix_lengths: ``[T]`` integer tensor: entry t uses only its first ``prefix_lengths[t]`` keys.
            prefix_index and prefix_lengths may have any strides (views, expanded tensors).
        key_padding_mask: ``[B, Nk]`` bool, True = attend: which sequence keys each sample may attend to (the
            cheapest mask for the kernels).
        attn_mask: as in :func:`torch.nn.functional.scaled_dot_product_attention`: a bool (True = attend) or
            float (added to the scores) tensor broadcastable to ``[B, Hq, Nq, Nk]``, so a 2-D mask is
            ``[Nq, Nk]``. A float mask is added like ``attn_bias`` (-inf hides a key).
            Masks apply to the sequence keys only; the prefix is always visible.
        attn_bias: an additive bias on the sequence keys' scores (after ``scale``, before the softmax), a float
            tensor broadcastable to ``[B, Hq, Nq, Nk]``, e.g. T5's relative position bias; the prefix keys get
            no bias. -inf entries hide their key like a mask. Differentiable: its gradient sums over the
            broadcast dims, without a buffer of the broadcast size.
        causal: causal over the sequence keys, aligned bottom-right (key j visible to query i iff
            ``j <= i + Nk - Nq``).
        scale: score scale, default ``1 / sqrt(Dk)``.
        dropout_p: dropout on the attention probabilities (prefix and sequence alike), drawn from torch's RNG.
        return_lse: also return the log-sum-exp ``[B, Hq, Nq]`` (float32, natural log; -inf where a query sees no
            key). It is differentiable.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"native"`` (torch's fused CPU attention, prefix and
            sequence parts merged by log-sum-exp) or ``"reference"``. A backend named explicitly that cannot serve
            the call raises ValueError saying why; ``"auto"`` picks the fastest one that can.
        deterministic: bitwise-reproducible prefix gradients (the batch reduction runs in a fixed order instead of
            with atomics). None follows ``torch.are_deterministic_algorithms_enabled()`` or ``PTV2_DETERMINISTIC=1``.
        softcap: a positive number c: every key's scaled score s (prefix keys too) becomes ``c * tanh(s / c)``
            before the additive terms and masks, as Gemma2's ``attn_logit_softcapping``.
        sinks: ``[Hq]`` float tensor, one logit per query head added to each row's softmax denominator and then
            dropped (GPT-OSS's ``s_aux``): ``p_j = exp(s_j) / (sum_i exp(s_i) + exp(sinks[h]))``. The lse then
            includes the sink, so a query that sees no key has out 0 and lse ``sinks[h]``. Differentiable.
        prefix_bias: an additive bias on the prefix keys' scores, as ``attn_bias`` is on the sequence keys': a float
            tensor broadcastable to ``[B, Hq, Nq, P]`` (column j is bank slot j; the slots past an entry's
            ``prefix_lengths`` stay hidden). What a prefix held in a model's cache would get from a position-
            dependent bias: T5's relative position bias or ALiBi over the prefix positions. -inf hides a prefix
            key from a query. Differentiable, like ``attn_bias``.
        window_size: ``(left, right)``, sliding-window attention as in FlashAttention: sequence key j is visible to
            query i iff ``i + Nk - Nq - left <= j <= i + Nk - Nq + right`` (the bottom-right alignment of
            ``causal``; -1 = unbounded on that side). Combines with ``causal`` and the masks (a key is visible iff
            every rule allows it). The prefix keys are not subject to it: to drop prefix slots out of a window,
            give them a ``prefix_bias`` of -inf. ``(-1, -1)`` is no window.

    Returns:
        ``out`` ``[B, Hq, Nq, Dv]`` in q's dtype, laid out in memory as ``[B, Nq, Hq, Dv]`` (so
        ``out.transpose(1, 2)`` is contiguous), or ``(out, lse)`` with ``return_lse``.
    """
    if (prefix_index is None and prefix_lengths is None and attn_mask is None and attn_bias is None
            and softcap is None and sinks is None and prefix_bias is None and window_size is None and not return_lse
            and type(dropout_p) in (float, int) and dropout_p == 0 and (backend == "auto" or backend == "native")
            and EAGER_PATH):
        # The call a model makes at every layer of inference: checked and computed in one step of the native
        # backend's extension where it serves it (a CPU call auto would send there), else the full path below.
        out = native.common_inference_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
        if out is not None:
            return out
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias = _checked(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_mask, attn_bias, causal,
        scale, dropout_p)
    softcap, sinks = _checked_score_options(softcap, sinks, q.shape[1], q.device)
    window_size = _checked_window_size(window_size, causal)
    if prefix_bias is not None:
        prefix_bias = _checked_bias("prefix_bias", prefix_bias, (*q.shape[:3], prefix_k.shape[2]), q.device)
    bias_grad = attn_bias is not None and attn_bias.requires_grad and torch.is_grad_enabled()
    name = backends.choose_for(backend, backends.Problem(q, k, prefix_k, dropout_p, attn_bias, bias_grad, softcap,
                                                         sinks, prefix_bias, v.shape[-1], window_size))
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=q.device)
    out, lse = _run(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, bool(causal),
        _scale_or_default(scale, q.shape[-1]), float(dropout_p), name, deterministic, sinks, softcap,
        prefix_bias, *_window_ints(window_size), need_lse=return_lse)
    return (out, lse) if return_lse else out


def _scale_or_default(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------

def _checked(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_mask, attn_bias,
             causal, scale, dropout_p):
    """Raise TypeError/ValueError/IndexError naming the bad argument; return the normalized arguments.

    This is the one place where arguments are normalized, so every backend receives the same forms:

    * the prefix as a 4-D bank ``[T, Hkv, P, Dk]`` (values ``[T, Hkv, P, Dv]``);
    * ``prefix_index`` and ``prefix_lengths`` contiguous (a strided or expanded index is copied once here);
    * the masks as one bool ``attn_mask``: None, a ``[B, Nk]`` key-padding mask, or a dense mask viewed as
      ``[B, Hq, Nq, Nk]`` (the user's bool attn_mask, with the key-padding mask folded in when both are given);
    * every additive term (``attn_bias`` and a float ``attn_mask``) as one float ``attn_bias`` of 4 dims whose
      size-1 dims broadcast (not expanded: its gradient keeps that compact shape).
    """
    _checked_qkv(q, k, v, 4, "[B, H, N, D]")
    batch, q_heads, q_len, head_dim = q.shape
    kv_batch, kv_heads, k_len, _ = k.shape
    if kv_batch != batch:
        raise ValueError(f"k and v must have q's batch size {batch}, got {kv_batch}")
    prefix_k, prefix_v, prefix_index, prefix_lengths = _checked_bank(
        prefix_k, prefix_v, prefix_index, prefix_lengths, kv_heads, head_dim, batch, q.device, value_dim=v.shape[-1])

    full = (batch, q_heads, q_len, k_len)
    mask = None
    if key_padding_mask is not None:
        mask = _checked_key_padding_mask(key_padding_mask, batch, k_len, q.device)
    if attn_mask is not None:
        attn_mask = _checked_broadcastable("attn_mask", attn_mask, full, q.device, key_padding_hint=True)
        _checked_mask_dtype(attn_mask)
        if attn_mask.dtype == torch.bool:
            dense = attn_mask if mask is None else attn_mask & mask[:, None, None, :]
            mask = dense.expand(full)
        else:
            attn_bias = (attn_mask if attn_bias is None
                         else _checked_bias("attn_bias", attn_bias, full, q.device) + attn_mask)
    if attn_bias is not None:
        attn_bias = _checked_bias("attn_bias", attn_bias, full, q.device)
    _checked_options(causal, scale, dropout_p)
    return q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask, attn_bias


def _checked_qkv(q, k, v, dims: int, layout: str):
    """The checks every form of the op makes of q, k, v (``dims``-D, head dim last, laid out as ``layout``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share a device")
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share a dtype")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    q_heads, head_dim = q.shape[1], q.shape[-1]  # [B, H, N, D] and [total, H, D] alike
    kv_heads, kv_dim, value_dim = k.shape[1], k.shape[-1], v.shape[-1]
    if kv_dim != head_dim:
        raise ValueError(f"k must have q's head dim Dk = {head_dim}, got {kv_dim} (shape {tuple(k.shape)})")
    if v.shape[:-1] != k.shape[:-1]:
        # v may have a head dim of its own (Dv, multi-head latent attention); the other dims are k's
        expected = [*k.shape[:-1], "Dv"]
        raise ValueError(f"v must be {layout} with k's sizes but for its head dim, {expected}, got shape "
                         f"{tuple(v.shape)}")
    if head_dim == 0:
        raise ValueError("q and k must have a head dim of at least 1, got 0")
    if value_dim == 0:
        raise ValueError("v must have a head dim of at least 1, got 0")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q's head count ({q_heads}) must be a multiple of k/v's head count ({kv_heads})")


def _checked_bank(prefix_k, prefix_v, prefix_index, prefix_lengths, kv_heads, head_dim, samples, device,
                  value_dim=None):
    """The prefix bank as 4-D ``[T, Hkv, P, Dk]`` / ``[T, Hkv, P, Dv]`` and its contiguous index tensors
    (``prefix_index`` ``[samples]``), checked against k's head count and head dim (``head_dim``) and v's head dim
    (``value_dim``, ``head_dim`` when None)."""
    value_dim = head_dim if value_dim is None else value_dim
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _checked_float_tensor(name, t, device)
    if prefix_k.dtype != prefix_v.dtype:
        raise TypeError(f"prefix_k and prefix_v must share a dtype, got {prefix_k.dtype} and {prefix_v.dtype}")
    if prefix_k.dim() not in (3, 4):
        raise ValueError(f"prefix_k must be [T, Hkv, P, Dk] or [Hkv, P, Dk], got shape {tuple(prefix_k.shape)}")
    if prefix_v.dim() != prefix_k.dim() or prefix_v.shape[:-1] != prefix_k.shape[:-1]:
        expected = [*prefix_k.shape[:-1], value_dim]
        raise ValueError(f"prefix_v must have prefix_k's sizes but for its head dim (v's, Dv = {value_dim}): "
                         f"expected {expected}, got shape {tuple(prefix_v.shape)}")
    given_k, given_v = tuple(prefix_k.shape), tuple(prefix_v.shape)
    layout = "[T, Hkv, P, {}]" if prefix_k.dim() == 4 else "[Hkv, P, {}]"
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    num_prefixes, prefix_heads, prefix_len, prefix_dim = prefix_k.shape
    sizes = [num_prefixes, kv_heads, prefix_len][-(len(given_k) - 1):]
    if prefix_heads != kv_heads or prefix_dim != head_dim:
        raise ValueError(f"prefix_k must have k's head count and head dim: expected {layout.format('Dk')} = "
                         f"{[*sizes, head_dim]}, got shape {given_k}")
    if prefix_v.shape[-1] != value_dim:
        raise ValueError(f"prefix_v must have v's head dim: expected {layout.format('Dv')} = "
                         f"{[*sizes, value_dim]}, got shape {given_v}")
    if num_prefixes == 0:
        raise ValueError("prefix_k and prefix_v must hold at least one prefix (T >= 1), got T = 0")
    if prefix_index is None:
        if num_prefixes != 1:
            raise ValueError(f"prefix_index is required when the bank holds several prefixes (T = {num_prefixes})")
    else:
        prefix_index = _checked_index_tensor("prefix_index", prefix_index, (samples,), device)
    if prefix_lengths is not None:
        prefix_lengths = _checked_index_tensor("prefix_lengths", prefix_lengths, (num_prefixes,), device)
    return prefix_k, prefix_v, prefix_index, prefix_lengths


def _checked_options(causal, scale, dropout_p):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")


def _checked_float_tensor(name, t, device):
    """Raise unless ``t`` is a floating-point tensor on q's device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; all inputs must share a device")


def _checked_score_options(softcap, sinks, q_heads, device):
    """(softcap as a float or None, sinks as given or None), checked: a positive finite cap, sinks a floating
    ``[Hq]`` tensor on q's device."""
    if softcap is not None:
        if (not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not math.isfinite(softcap)
                or softcap <= 0):
            raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
        softcap = float(softcap)
    if sinks is not None:
        _checked_float_tensor("sinks", sinks, device)
        if tuple(sinks.shape) != (q_heads,):
            raise ValueError(f"sinks must have shape [Hq] = [{q_heads}] (one logit per query head), got "
                             f"{list(sinks.shape)}")
    return softcap, sinks


def _checked_window_size(window_size, causal) -> Optional[tuple[int, int]]:
    """``window_size`` as ``(left, right)`` ints (-1: unbounded), or None where it hides nothing the causal rule
    does not: ``(-1, -1)``, or ``(-1, right)`` with ``causal`` (which caps right at 0)."""
    if window_size is None:
        return None
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(not isinstance(side, int) or isinstance(side, bool) or side < -1 for side in window_size)):
        raise ValueError(f"window_size must be None or a pair (left, right) of ints >= -1 (-1: unbounded on that "
                         f"side), got {window_size!r}")
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = -1  # the causal rule caps the right side at 0 already
    return None if (left, right) == (-1, -1) else (left, right)


def _window_ints(window_size) -> tuple[int, int]:
    """The custom ops' two window arguments: (left, right), (-1, -1) for no window."""
    return (-1, -1) if window_size is None else window_size


def _window_or_none(window_left: int, window_right: int) -> Optional[tuple[int, int]]:
    return None if (window_left, window_right) == (-1, -1) else (window_left, window_right)


def _checked_index_tensor(name, t, shape, device) -> Tensor:
    """The index tensor, contiguous: the kernels read entry ``i`` at offset ``i``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; all inputs must share a device")
    return t if t.is_contiguous() else t.contiguous()


# The values of prefix_index/prefix_lengths live on the device: reading them costs a synchronization. They are
# checked inside the custom op, which runs eagerly under torch.compile too. A model passes the same task-id tensor to
# every layer, and a server may alternate between a few, so the last few pairs of tensors checked (with their
# versions, which in-place writes bump) are remembered and not read again. While a CUDA graph is being captured
# nothing can be read; the kernels never read out of bounds regardless: an index out of range gives NaN rows, a
# length is clamped to [0, P].
_checked_values = Memo(capacity=8)


def _check_index_values(prefix_index, num_prefixes, prefix_lengths, prefix_len):
    if prefix_index is None and prefix_lengths is None:
        return
    if any(t is not None and t.is_cuda for t in (prefix_index, prefix_lengths)) and \
            torch.cuda.is_current_stream_capturing():
        return
    # Inference tensors have no version counter: they are checked every time, never remembered.
    cacheable = not any(t is not None and t.is_inference() for t in (prefix_index, prefix_lengths))
    slot = (id(prefix_index), id(prefix_lengths))
    state = (num_prefixes, prefix_len, _version(prefix_index), _version(prefix_lengths)) if cacheable else None
    if cacheable:
        remembered = _checked_values.get(slot)
        if (remembered is not None and _deref(remembered[0]) is prefix_index
                and _deref(remembered[1]) is prefix_lengths and remembered[2] == state):
            return
    # One read of the device (min and max of both tensors together), not four.
    extremes = [t.aminmax() for t in (prefix_index, prefix_lengths) if t is not None and t.numel()]
    if extremes:
        values = torch.stack([x.to(torch.int64) for pair in extremes for x in pair]).tolist()
        if prefix_index is not None and prefix_index.numel():
            (low, high), values = values[:2], values[2:]
            if low < 0 or high >= num_prefixes:
                raise IndexError(f"prefix_index entries must be in [0, {num_prefixes}) (the bank holds T = "
                                 f"{num_prefixes} prefixes), got {low if low < 0 else high}")
        if values:
            low, high = values
            if low < 0 or high > prefix_len:
                raise ValueError(f"prefix_lengths entries must be in [0, P] with P = {prefix_len}, got "
                                 f"{low if low < 0 else high}")
    if cacheable:
        _checked_values.put(slot, (_weak(prefix_index), _weak(prefix_lengths), state))


def _version(t):
    return None if t is None else t._version


def _weak(t):
    return None if t is None else weakref.ref(t)


def _deref(ref):
    return None if ref is None else ref()


def _checked_key_padding_mask(mask, batch, k_len, device) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = attend), got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {device}")
    if tuple(mask.shape) != (batch, k_len):
        raise ValueError(f"key_padding_mask must be [B, Nk] = [{batch}, {k_len}], got {list(mask.shape)}")
    return mask


def _checked_broadcastable(name, t, full, device, key_padding_hint=False, columns="Nk") -> Tensor:
    """``t`` (bool or float, broadcastable to ``full`` = [B, Hq, Nq, Nk] by torch's rules; [B, Hq, Nq, P] for the
    prefix columns, ``columns`` = "P") viewed as 4-D with its size-1 dims kept: a compact view, never expanded
    here."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    shape = tuple(t.shape)
    if t.dim() > 4 or any(size not in (1, want) for size, want in zip(reversed(shape), reversed(full))):
        message = (f"{name} must be broadcastable to [B, Hq, Nq, {columns}] = {list(full)} (as in "
                   f"scaled_dot_product_attention; a 2-D {name} is [Nq, {columns}]), got shape {list(shape)}")
        if key_padding_hint and shape == (full[0], full[3]):
            message += "; for a [B, Nk] key-padding mask pass key_padding_mask= instead"
        raise ValueError(message)
    return t[(None,) * (4 - t.dim())]


def _checked_mask_dtype(attn_mask):
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be a bool tensor (True = attend) or a float tensor (added to the scores), "
                        f"got {attn_mask.dtype}")


def _checked_bias(name, bias, full, device) -> Tensor:
    """An additive bias (``attn_bias`` over the sequence keys, ``prefix_bias`` over the prefix slots) as a compact
    4-D view (size-1 dims broadcast; the backends expand it, its gradient keeps it)."""
    if isinstance(bias, Tensor) and not bias.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {bias.dtype}")
    return _checked_broadcastable(name, bias, full, device, columns="P" if name == "prefix_bias" else "Nk")


# ----------------------------------------------------------------------------------------------------------------
# The custom ops and their autograd
# ----------------------------------------------------------------------------------------------------------------

def _forward_body(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal,
                  scale, dropout_p, backend, deterministic, sinks=None, softcap=None, prefix_bias=None,
                  window_left=-1, window_right=-1):
    """(out, lse): the forward, shared by the custom op and the eager path."""
    _check_index_values(prefix_index, prefix_k.shape[0], prefix_lengths, prefix_k.shape[2])
    return backends.implementation(backend).forward(_call(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal, scale,
        dropout_p, deterministic, sinks, softcap, prefix_bias, window_left, window_right))


def _call(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal, scale,
          dropout_p, deterministic, sinks, softcap, prefix_bias, window_left, window_right) -> Call:
    """The custom op's flat arguments as the :class:`~ptv2_kernels.call.Call` the backends receive (the additive
    terms expanded, as views, to the scores' shape; the window as a pair or None)."""
    return Call(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask,
                _expanded_bias(attn_bias, q, k.shape[2]), seed, causal, scale, dropout_p, deterministic, softcap,
                sinks, _expanded_bias(prefix_bias, q, prefix_k.shape[2]), _window_or_none(window_left, window_right))


# sinks, softcap, prefix_bias and the window come last, with defaults: calls without them keep the schema's earlier
# positions.
@torch.library.custom_op("ptv2_kernels::prefix_attention", mutates_args=())
def _prefix_attention_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_index: Optional[Tensor],
    prefix_lengths: Optional[Tensor], attn_mask: Optional[Tensor], attn_bias: Optional[Tensor],
    seed: Optional[Tensor], causal: bool, scale: float, dropout_p: float, backend: str, deterministic: bool,
    sinks: Optional[Tensor] = None, softcap: Optional[float] = None, prefix_bias: Optional[Tensor] = None,
    window_left: int = -1, window_right: int = -1,
) -> tuple[Tensor, Tensor]:
    return _forward_body(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed,
                         causal, scale, dropout_p, backend, deterministic, sinks, softcap, prefix_bias, window_left,
                         window_right)


def _expanded_bias(bias: Optional[Tensor], q: Tensor, columns: int) -> Optional[Tensor]:
    """A compact bias as the [B, Hq, Nq, columns] view the backends read (stride 0 along broadcast dims):
    Nk columns for ``attn_bias``, P for ``prefix_bias``."""
    return None if bias is None else bias.expand(*q.shape[:3], columns)


@_prefix_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal, scale,
      dropout_p, backend, deterministic, sinks=None, softcap=None, prefix_bias=None, window_left=-1, window_right=-1):
    batch, heads, length = q.shape[:3]
    out = q.new_empty(batch, length, heads, v.shape[-1]).transpose(1, 2)
    return out, q.new_empty(batch, heads, length, dtype=torch.float32)


@torch.library.custom_op("ptv2_kernels::prefix_attention_backward", mutates_args=())
def _prefix_attention_backward_op(
    grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor,
    prefix_v: Tensor, prefix_index: Optional[Tensor], prefix_lengths: Optional[Tensor], attn_mask: Optional[Tensor],
    attn_bias: Optional[Tensor], seed: Optional[Tensor], out: Tensor, lse: Tensor, causal: bool, scale: float,
    dropout_p: float, backend: str, deterministic: bool, bias_grad: bool, sinks: Optional[Tensor] = None,
    softcap: Optional[float] = None, prefix_bias: Optional[Tensor] = None, prefix_bias_grad: bool = False,
    window_left: int = -1, window_right: int = -1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The five input gradients, the bias gradient (in the compact bias's shape and dtype) when ``bias_grad``,
    else an empty tensor, the sinks' gradient (in their dtype) when there are sinks, else an empty tensor, and
    the prefix bias's gradient (as the bias's) when ``prefix_bias_grad``, else an empty tensor."""
    return _backward_body(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask,
                          attn_bias, seed, out, lse, causal, scale, dropout_p, backend, deterministic, bias_grad,
                          sinks=sinks, softcap=softcap, prefix_bias=prefix_bias, prefix_bias_grad=prefix_bias_grad,
                          window_left=window_left, window_right=window_right)


def _backward_body(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask,
                   attn_bias, seed, out, lse, causal, scale, dropout_p, backend, deterministic, bias_grad,
                   sinks=None, softcap=None, prefix_bias=None, prefix_bias_grad=False, window_left=-1,
                   window_right=-1, exact_layout=True):
    """The backward, shared by the custom op and the eager path. ``exact_layout``: each gradient in the layout of
    ``empty_like`` of its input, as the custom op's fake implementation promises (a copy where a backend's layout
    differs); the eager path promises nothing and takes the backend's layout as autograd does any other op's.

    The sinks' gradient: the backends write it (float32 ``[Hq]``) into ``grad_sinks``, summed over the rows they
    are given; the batch chunks of a bias gradient add theirs in order."""
    impl = backends.implementation(backend)
    inputs = (q, k, v, prefix_k, prefix_v)
    call = _call(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal,
                 scale, dropout_p, deterministic, sinks, softcap, prefix_bias, window_left, window_right)
    buffers = {}
    grad_sinks = q.new_empty(0, dtype=torch.float32)
    if sinks is not None:
        grad_sinks = torch.zeros(sinks.shape, dtype=torch.promote_types(torch.float32, sinks.dtype),
                                 device=q.device)
        buffers["grad_sinks"] = grad_sinks
    # The additive terms whose gradient is asked for: (compact term, the backends' expanded view of it, the
    # backends' keyword for its dense gradient buffer).
    biases = []
    if bias_grad and attn_bias is not None:
        biases.append((attn_bias, call.attn_bias, "grad_bias"))
    if prefix_bias_grad and prefix_bias is not None:
        biases.append((prefix_bias, call.prefix_bias, "grad_prefix_bias"))
    def no_grad():  # a fresh empty tensor each: a custom op's outputs may not alias each other
        return q.new_empty(0, dtype=torch.float32)

    if not biases:
        grads = impl.backward(grad_out, grad_lse, call, out, lse, **buffers)
        return (*(_laid_out_like(g, x, exact_layout) for g, x in zip(grads, inputs)), no_grad(),
                _sinks_grad_out(grad_sinks, sinks), no_grad())

    # The backends write a bias gradient densely ([n, Hq, Nq, columns] for n samples, in float32). A bias that
    # broadcasts (T5's [1, H, N, N]) would need a buffer B * Hq / H times its own size for the whole batch at once,
    # so the batch runs in chunks whose dense buffers are about the biases' size, each chunk summed into the compact
    # gradients as it finishes (in a fixed order: deterministic). Dropout numbers its random streams by sample, so
    # a call with dropout runs in one piece.
    reduced = [[dim for dim in range(4) if term.shape[dim] == 1 and view.shape[dim] != 1]
               for term, view, _ in biases]
    batch = q.shape[0]
    per_sample = sum(view[0].numel() * 4 for _, view, _ in biases)
    chunk = batch
    if any(reduced) and dropout_p == 0.0 and per_sample:
        compact = sum(term.numel() * 4 for term, _, _ in biases)
        chunk = max(1, min(batch, max(compact, BIAS_GRAD_CHUNK_BYTES) // per_sample))
    # float32, or float64 for a float64 bias
    accumulate = [torch.promote_types(torch.float32, term.dtype) for term, _, _ in biases]
    if chunk >= batch:
        dense = [torch.zeros(view.shape, dtype=dtype, device=q.device)
                 for (_, view, _), dtype in zip(biases, accumulate)]
        grads = impl.backward(grad_out, grad_lse, call, out, lse, **buffers,
                              **{key: buffer for (_, _, key), buffer in zip(biases, dense)})
        grads = tuple(_laid_out_like(g, x, exact_layout) for g, x in zip(grads, inputs))
        bias_grads = [buffer.sum(dims, keepdim=True) if dims else buffer for buffer, dims in zip(dense, reduced)]
    else:
        grads = [torch.empty_like(x) for x in (q, k, v)]
        prefix_grads = [torch.zeros(x.shape, dtype=torch.promote_types(torch.float32, x.dtype), device=x.device)
                        for x in (prefix_k, prefix_v)]
        bias_grads = [torch.zeros(term.shape, dtype=dtype, device=q.device)
                      for (term, _, _), dtype in zip(biases, accumulate)]
        for start in range(0, batch, chunk):
            rows = slice(start, min(batch, start + chunk))
            dense = [torch.zeros((rows.stop - rows.start, *view.shape[1:]), dtype=dtype, device=q.device)
                     for (_, view, _), dtype in zip(biases, accumulate)]
            chunk_buffers = {} if sinks is None else {"grad_sinks": torch.zeros_like(grad_sinks)}
            part = impl.backward(
                grad_out[rows], None if grad_lse is None else grad_lse[rows], call.samples(rows), out[rows],
                lse[rows], **chunk_buffers, **{key: buffer for (_, _, key), buffer in zip(biases, dense)})
            if sinks is not None:
                grad_sinks += chunk_buffers["grad_sinks"]
            for whole, piece in zip(grads, part[:3]):
                whole[rows].copy_(piece)
            for whole, piece in zip(prefix_grads, part[3:]):
                whole += piece
            for whole, buffer, dims in zip(bias_grads, dense, reduced):
                if 0 in dims:
                    whole += buffer.sum(dims, keepdim=True)
                else:
                    whole[rows] = buffer.sum(dims, keepdim=True) if dims else buffer
        grads += [g.to(x.dtype) for g, x in zip(prefix_grads, (prefix_k, prefix_v))]
        grads = tuple(_laid_out_like(g, x, exact_layout) for g, x in zip(grads, inputs))
    by_key = {key: g.to(term.dtype) for (term, _, key), g in zip(biases, bias_grads)}
    return (*grads, by_key.get("grad_bias", no_grad()), _sinks_grad_out(grad_sinks, sinks),
            by_key.get("grad_prefix_bias", no_grad()))


def _sinks_grad_out(grad_sinks: Tensor, sinks: Optional[Tensor]) -> Tensor:
    """The sinks' gradient in their dtype, or the empty tensor the op returns without sinks."""
    return grad_sinks if sinks is None else grad_sinks.to(sinks.dtype)


# The most memory a dense bias-gradient chunk may take beyond the bias's own size (see the backward op).
BIAS_GRAD_CHUNK_BYTES = 16 * 2**20


def _laid_out_like(grad: Optional[Tensor], x: Tensor, exact: bool = True) -> Tensor:
    """``grad`` in the layout of ``torch.empty_like(x)``, which the fake implementation promises (the kernels
    allocate it that way; the reference returns slices), or as it is when not ``exact``. An unused gradient comes
    back as zeros."""
    if grad is not None and not exact:
        return grad
    if grad is not None and grad.stride() == x.stride() and grad.storage_offset() == 0 and _dense(x):
        return grad  # empty_like(x) keeps the strides of a dense x: the same layout, no need to make one
    out = torch.empty_like(x)
    if grad is None:
        return out.zero_()
    if grad.stride() == out.stride() and grad.storage_offset() == 0:
        return grad
    return out.copy_(grad)


def _dense(x: Tensor) -> bool:
    """x is non-overlapping and dense in the two layouts the op meets (contiguous, or [B, N, H, D] memory viewed as
    [B, H, N, D]), for which ``empty_like`` keeps x's strides."""
    return x.is_contiguous() or (x.dim() == 4 and x.transpose(1, 2).is_contiguous())


@_prefix_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, out,
      lse, causal, scale, dropout_p, backend, deterministic, bias_grad, sinks=None, softcap=None, prefix_bias=None,
      prefix_bias_grad=False, window_left=-1, window_right=-1):
    grads = tuple(torch.empty_like(x) for x in (q, k, v, prefix_k, prefix_v))
    grad_sinks = q.new_empty(0, dtype=torch.float32) if sinks is None else torch.empty_like(sinks)
    grad_bias, grad_prefix_bias = (q.new_empty(0, dtype=torch.float32) for _ in range(2))
    if bias_grad and attn_bias is not None:
        grad_bias = torch.empty_like(attn_bias, memory_format=torch.contiguous_format)
    if prefix_bias_grad and prefix_bias is not None:
        grad_prefix_bias = torch.empty_like(prefix_bias, memory_format=torch.contiguous_format)
    return (*grads, grad_bias, grad_sinks, grad_prefix_bias)


_BIAS_INPUT = 8  # the position of attn_bias among the forward op's inputs
_SINKS_INPUT = 15  # and of sinks
_PREFIX_BIAS_INPUT = 17  # and of prefix_bias


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal, scale, dropout_p,
     backend, deterministic, *score_options) = inputs
    # a direct call may leave the trailing arguments out
    sinks, softcap, prefix_bias, window_left, window_right = (*score_options, None, None, None, -1, -1)[:5]
    out, lse = output
    ctx.set_materialize_grads(False)  # an unused lse gets no gradient: the backends skip its terms
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed,
                          out, lse, sinks, prefix_bias)
    ctx.options = (causal, scale, dropout_p, backend, deterministic)
    ctx.softcap, ctx.window, ctx.num_inputs = softcap, (window_left, window_right), len(inputs)


def _backward(ctx, grad_out, grad_lse, backward_fn=None):
    (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, out, lse,
     sinks, prefix_bias) = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    bias_grad = attn_bias is not None and ctx.needs_input_grad[_BIAS_INPUT]
    prefix_bias_grad = prefix_bias is not None and ctx.needs_input_grad[_PREFIX_BIAS_INPUT]
    *grads, grad_bias, grad_sinks, grad_prefix_bias = (
        backward_fn or torch.ops.ptv2_kernels.prefix_attention_backward)(
        grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed,
        out, lse, *ctx.options, bias_grad, sinks, ctx.softcap, prefix_bias, prefix_bias_grad, *ctx.window)
    result = [*grads] + [None] * (ctx.num_inputs - len(grads))
    if bias_grad:
        result[_BIAS_INPUT] = grad_bias
    if sinks is not None and ctx.needs_input_grad[_SINKS_INPUT]:
        result[_SINKS_INPUT] = grad_sinks
    if prefix_bias_grad:
        result[_PREFIX_BIAS_INPUT] = grad_prefix_bias
    return tuple(result)


torch.library.register_autograd("ptv2_kernels::prefix_attention", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# The eager path
# ----------------------------------------------------------------------------------------------------------------

class _EagerPrefixAttention(torch.autograd.Function):
    """The op in eager mode: the custom ops' own forward and backward bodies and autograd rule, without the
    dispatcher's per-call cost (tens of microseconds a call, paid per layer per step). The registered custom ops
    remain what torch.compile traces, and what serves fake tensors, tensor subclasses, functorch transforms and
    dispatch modes (see :func:`_eager_path_serves`)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_body(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        return _backward(ctx, grad_out, grad_lse, backward_fn=_eager_backward_body)


def _eager_backward_body(*args):
    return _backward_body(*args, exact_layout=False)


def _eager_path_serves(tensors) -> bool:
    """True where :class:`_EagerPrefixAttention` gives what the custom op would: plain tensors on a real device,
    outside torch.compile, functorch transforms and dispatch modes (which must see the op, not its pieces)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._len_torch_dispatch_stack() > 0:
        return False
    # the inputs share q's device (checked by _checked)
    if tensors[0].is_meta:
        return False
    for t in tensors:  # a loop, not all() over a generator: this runs per layer per step
        if t is not None and type(t) is not Tensor:
            return False
    return True


def _any_requires_grad(tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _run(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal, scale,
         dropout_p, backend, deterministic, sinks=None, softcap=None, prefix_bias=None, window_left=-1,
         window_right=-1, need_lse=True):
    """The op on checked, normalized arguments; ``deterministic`` None: the default (see :func:`_deterministic`).
    ``need_lse`` False: the caller discards the lse, which may then come back as None."""
    tensors = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, sinks,
               prefix_bias)
    grad_needed = _any_requires_grad(tensors)
    if deterministic is None:
        deterministic = _deterministic(grad_needed)
    inputs = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal, scale,
              dropout_p, backend, bool(deterministic), sinks, softcap, prefix_bias, window_left, window_right)
    if EAGER_PATH and _eager_path_serves(tensors):
        if not grad_needed:
            return _forward_body(*inputs)  # nothing to differentiate: no autograd node to build
        recorded = _recorded_forward(*inputs, need_lse=need_lse)
        if recorded is not None:
            return recorded
        return _EagerPrefixAttention.apply(*inputs)
    return torch.ops.ptv2_kernels.prefix_attention(*inputs)


def _recorded_forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal,
                      scale, dropout_p, backend, deterministic, sinks, softcap, prefix_bias, window_left,
                      window_right, need_lse=True):
    """The forward as differentiable torch operations that autograd records, where the backend offers them for the
    call (``differentiable_forward``: native's math composition, for dropout and bias gradients), else None.
    Eager mode only: the custom op is what torch.compile traces, and its backward computes the same formulas."""
    recorded = getattr(backends.implementation(backend), "differentiable_forward", None)
    if recorded is None or sinks is not None or softcap is not None or prefix_bias is not None:
        return None
    bias_grad = attn_bias is not None and attn_bias.requires_grad
    if dropout_p == 0.0 and not bias_grad:
        return None
    _check_index_values(prefix_index, prefix_k.shape[0], prefix_lengths, prefix_k.shape[2])
    return recorded(_call(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed,
                          causal, scale, dropout_p, deterministic, sinks, softcap, prefix_bias, window_left,
                          window_right), bias_grad=bias_grad, need_lse=need_lse)


def _deterministic(grad_needed: bool) -> bool:
    """The default of ``deterministic``: torch's deterministic mode or ``PTV2_DETERMINISTIC=1``. The flag orders
    only the backward's reductions, so where no gradient can be asked for the environment, slow to read (a few
    microseconds, per layer per step), is not read."""
    if torch.are_deterministic_algorithms_enabled():
        return True
    if not grad_needed and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active():
        return False
    return os.environ.get("PTV2_DETERMINISTIC", "0") not in ("", "0")


# False: every call goes through the registered custom op (the tests compare the two paths).
EAGER_PATH = True
