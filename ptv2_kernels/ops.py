"""The op: ``prefix_attention`` — argument checks, backend choice, autograd and ``torch.library`` registration.

The public function checks and normalizes its arguments (a 3-D prefix becomes a bank of one, a mask becomes a
key-padding mask or a dense mask viewed as ``[B, Hq, Nq, Nk]``), picks a backend and calls the custom op
``ptv2_kernels::prefix_attention``. That op and its backward are opaque ``torch.library`` custom ops with fake
implementations, so ``torch.compile(fullgraph=True)`` traces through them without a graph break.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Optional, Union

import torch
from torch import Tensor

from . import backends

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
    attn_mask: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
    deterministic: Optional[bool] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention of ``q`` over a per-layer prefix followed by the sequence's own keys/values, without concatenating.

    Args:
        q: ``[B, Hq, Nq, D]`` queries; any strides with the last dim contiguous.
        k, v: ``[B, Hkv, Nk, D]`` sequence keys/values; ``Hq % Hkv == 0`` (GQA/MQA without repeating K/V).
        prefix_k, prefix_v: ``[T, Hkv, P, D]`` bank of T prefixes, or ``[Hkv, P, D]`` for a single one; any strides;
            their dtype may differ from q's (converted on load, gradient returned in their own dtype).
        prefix_index: ``[B]`` integer tensor, entries in ``[0, T)``: the bank entry of each sample. None needs T = 1.
        prefix_lengths: ``[T]`` integer tensor: entry t uses only its first ``prefix_lengths[t]`` keys.
        attn_mask: bool, True = attend. ``[B, Nk]`` key padding, or a dense ``[B, 1|Hq, Nq, Nk]`` mask (size-1
            dims broadcast). Masks apply to the sequence keys only; the prefix is always visible.
        attn_bias: an additive bias on the sequence keys' scores (after ``scale``, before the softmax), float
            ``[B, 1|Hq, Nq, Nk]`` (size-1 dims broadcast), e.g. T5's relative position bias; the prefix keys get
            no bias. -inf entries hide their key like a mask. Differentiable: its gradient sums over the
            broadcast dims.
        causal: causal over the sequence keys, aligned bottom-right (key j visible to query i iff
            ``j <= i + Nk - Nq``).
        scale: score scale, default ``1 / sqrt(D)``.
        dropout_p: dropout on the attention probabilities (prefix and sequence alike), drawn from torch's RNG.
        return_lse: also return the log-sum-exp ``[B, Hq, Nq]`` (float32, natural log; -inf where a query sees no
            key). It is differentiable.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"``. A backend named explicitly that cannot
            serve the call raises ValueError saying why; ``"auto"`` picks the fastest one that can.
        deterministic: bitwise-reproducible prefix gradients (the batch reduction runs in a fixed order instead of
            with atomics). None follows ``torch.are_deterministic_algorithms_enabled()`` or ``PTV2_DETERMINISTIC=1``.

    Returns:
        ``out`` ``[B, Hq, Nq, D]`` in q's dtype, laid out in memory as ``[B, Nq, Hq, D]`` (so
        ``out.transpose(1, 2)`` is contiguous), or ``(out, lse)`` with ``return_lse``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    q, k, v, prefix_k, prefix_v, attn_mask, attn_bias = _checked(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, causal, scale, dropout_p)
    name = backends.choose(backend, q, k, prefix_k, dropout_p, attn_bias)
    if deterministic is None:
        deterministic = (torch.are_deterministic_algorithms_enabled()
                         or os.environ.get("PTV2_DETERMINISTIC", "0") not in ("", "0"))
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=q.device)
    out, lse = torch.ops.ptv2_kernels.prefix_attention(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, bool(causal),
        _scale_or_default(scale, q.shape[-1]), float(dropout_p), name, bool(deterministic))
    return (out, lse) if return_lse else out


def _scale_or_default(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------

def _checked(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, causal, scale,
             dropout_p):
    """Raise TypeError/ValueError/IndexError naming the bad argument; return the normalized tensors."""
    for name, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share a device")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share a dtype")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    batch, q_heads, q_len, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    kv_batch, kv_heads, k_len, kv_dim = k.shape
    if kv_batch != batch:
        raise ValueError(f"k and v must have q's batch size {batch}, got {kv_batch}")
    if kv_dim != head_dim:
        raise ValueError(f"k and v must have q's head dim {head_dim}, got {kv_dim}")
    if head_dim == 0:
        raise ValueError("q, k and v must have a head dim of at least 1, got 0")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q's head count ({q_heads}) must be a multiple of k/v's head count ({kv_heads})")

    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} and "
                         f"{tuple(prefix_v.shape)}")
    if prefix_k.dtype != prefix_v.dtype:
        raise TypeError(f"prefix_k and prefix_v must share a dtype, got {prefix_k.dtype} and {prefix_v.dtype}")
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    elif prefix_k.dim() != 4:
        raise ValueError(f"prefix_k and prefix_v must be [T, Hkv, P, D] or [Hkv, P, D], got shape "
                         f"{tuple(prefix_k.shape)}")
    num_prefixes, prefix_heads, prefix_len, prefix_dim = prefix_k.shape
    if prefix_heads != kv_heads or prefix_dim != head_dim:
        raise ValueError(f"prefix_k and prefix_v must have k's head count and head dim (Hkv={kv_heads}, "
                         f"D={head_dim}), got Hkv={prefix_heads}, D={prefix_dim}")
    if num_prefixes == 0:
        raise ValueError("prefix_k and prefix_v must hold at least one prefix (T >= 1), got T = 0")

    if prefix_index is None:
        if num_prefixes != 1:
            raise ValueError(f"prefix_index is required when the bank holds several prefixes (T = {num_prefixes})")
    else:
        _check_index_tensor("prefix_index", prefix_index, (batch,), q.device)
    if prefix_lengths is not None:
        _check_index_tensor("prefix_lengths", prefix_lengths, (num_prefixes,), q.device)

    if attn_mask is not None:
        attn_mask = _checked_mask(attn_mask, batch, q_heads, q_len, k_len, q.device)
    if attn_bias is not None:
        attn_bias = _checked_bias(attn_bias, batch, q_heads, q_len, k_len, q.device)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return q, k, v, prefix_k, prefix_v, attn_mask, attn_bias


def _check_index_tensor(name, t, shape, device):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; all inputs must share a device")


# The values of prefix_index/prefix_lengths live on the device: reading them costs a synchronization. They are
# checked inside the custom op, which runs eagerly under torch.compile too. A model passes the same task-id tensor to
# every layer, so the last tensors checked (and their versions, which in-place writes bump) are remembered and not
# read again. While a CUDA graph is being captured nothing can be read; the kernels never read out of bounds
# regardless: an index out of range gives NaN rows, a length is clamped to [0, P].
_last_checked: list = [None, None, None]  # (weakref to prefix_index, weakref to prefix_lengths, bounds+versions)


def _check_index_values(prefix_index, num_prefixes, prefix_lengths, prefix_len):
    if prefix_index is None and prefix_lengths is None:
        return
    if prefix_index is not None and prefix_index.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    # Inference tensors have no version counter: they are checked every time, never remembered.
    cacheable = not any(t is not None and t.is_inference() for t in (prefix_index, prefix_lengths))
    key = (num_prefixes, prefix_len, _version(prefix_index), _version(prefix_lengths)) if cacheable else None
    if (cacheable and _deref(_last_checked[0]) is prefix_index and _deref(_last_checked[1]) is prefix_lengths
            and _last_checked[2] == key):
        return
    if prefix_index is not None and prefix_index.numel():
        low, high = int(prefix_index.min()), int(prefix_index.max())
        if low < 0 or high >= num_prefixes:
            bad = low if low < 0 else high
            raise IndexError(f"prefix_index entries must be in [0, {num_prefixes}) (the bank holds T = "
                             f"{num_prefixes} prefixes), got {bad}")
    if prefix_lengths is not None and prefix_lengths.numel():
        low, high = int(prefix_lengths.min()), int(prefix_lengths.max())
        if low < 0 or high > prefix_len:
            raise ValueError(f"prefix_lengths entries must be in [0, P] with P = {prefix_len}, got "
                             f"{low if low < 0 else high}")
    if cacheable:
        _last_checked[:] = [_weak(prefix_index), _weak(prefix_lengths), key]


def _version(t):
    return None if t is None else t._version


def _weak(t):
    return None if t is None else weakref.ref(t)


def _deref(ref):
    return None if ref is None else ref()


def _checked_mask(attn_mask, batch, q_heads, q_len, k_len, device):
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be a bool tensor (True = attend), got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {device}")
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (batch, k_len):
            raise ValueError(f"a 2-D attn_mask is a key-padding mask [B, Nk] = [{batch}, {k_len}], got "
                             f"{list(attn_mask.shape)}")
        return attn_mask
    if attn_mask.dim() == 4:
        full = (batch, q_heads, q_len, k_len)
        if any(size not in (1, want) for size, want in zip(attn_mask.shape, full)):
            raise ValueError(f"a 4-D attn_mask must be [B, 1 or Hq, Nq, Nk] = [{batch}, 1 or {q_heads}, {q_len}, "
                             f"{k_len}] (size-1 dims broadcast), got {list(attn_mask.shape)}")
        return attn_mask.expand(full)
    raise ValueError(f"attn_mask must be a [B, Nk] key-padding mask or a [B, 1|Hq, Nq, Nk] dense mask, got "
                     f"{attn_mask.dim()}-D shape {list(attn_mask.shape)}")


def _checked_bias(attn_bias, batch, q_heads, q_len, k_len, device):
    """The bias as a [B, Hq, Nq, Nk] view (broadcast dims with stride 0; autograd sums its gradient over them)."""
    if not isinstance(attn_bias, Tensor):
        raise TypeError(f"attn_bias must be a torch.Tensor or None, got {type(attn_bias).__name__}")
    if not attn_bias.is_floating_point():
        raise TypeError(f"attn_bias must have a floating-point dtype, got {attn_bias.dtype}")
    if attn_bias.device != device:
        raise ValueError(f"attn_bias is on {attn_bias.device} but q is on {device}")
    full = (batch, q_heads, q_len, k_len)
    if attn_bias.dim() != 4 or any(size not in (1, want) for size, want in zip(attn_bias.shape, full)):
        raise ValueError(f"attn_bias must be [B, 1 or Hq, Nq, Nk] = [{batch}, 1 or {q_heads}, {q_len}, {k_len}] "
                         f"(size-1 dims broadcast), got shape {list(attn_bias.shape)}")
    return attn_bias.expand(full)


# ----------------------------------------------------------------------------------------------------------------
# The custom ops and their autograd
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("ptv2_kernels::prefix_attention", mutates_args=())
def _prefix_attention_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_index: Optional[Tensor],
    prefix_lengths: Optional[Tensor], attn_mask: Optional[Tensor], attn_bias: Optional[Tensor],
    seed: Optional[Tensor], causal: bool, scale: float, dropout_p: float, backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    _check_index_values(prefix_index, prefix_k.shape[0], prefix_lengths, prefix_k.shape[2])
    return backends.implementation(backend).forward(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed, causal, scale, dropout_p,
        attn_bias=attn_bias)


@_prefix_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal, scale,
      dropout_p, backend, deterministic):
    batch, heads, length, dim = q.shape
    out = q.new_empty(batch, length, heads, dim).transpose(1, 2)
    return out, q.new_empty(batch, heads, length, dtype=torch.float32)


@torch.library.custom_op("ptv2_kernels::prefix_attention_backward", mutates_args=())
def _prefix_attention_backward_op(
    grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor,
    prefix_v: Tensor, prefix_index: Optional[Tensor], prefix_lengths: Optional[Tensor], attn_mask: Optional[Tensor],
    attn_bias: Optional[Tensor], seed: Optional[Tensor], out: Tensor, lse: Tensor, causal: bool, scale: float,
    dropout_p: float, backend: str, deterministic: bool, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The five input gradients, and the bias gradient ([B, Hq, Nq, Nk] in the bias's dtype) when ``bias_grad``,
    else an empty tensor."""
    grad_bias = _bias_grad_buffer(q, attn_bias, bias_grad)
    grads = backends.implementation(backend).backward(
        grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed, out, lse,
        causal, scale, dropout_p, deterministic, attn_bias=attn_bias, grad_bias=grad_bias)
    grads = tuple(_laid_out_like(g, x) for g, x in zip(grads, (q, k, v, prefix_k, prefix_v)))
    if grad_bias.numel():
        grad_bias = grad_bias.to(attn_bias.dtype)
    return (*grads, grad_bias)


def _bias_grad_buffer(q, attn_bias, bias_grad) -> Tensor:
    """Where a backend writes the bias gradient: float32 [B, Hq, Nq, Nk] zeros (keys a causal query never sees are
    never visited), or an empty tensor when none is wanted."""
    if attn_bias is None or not bias_grad:
        return q.new_empty(0, dtype=torch.float32)
    return torch.zeros(attn_bias.shape, dtype=torch.float32, device=q.device)


def _laid_out_like(grad: Optional[Tensor], x: Tensor) -> Tensor:
    """``grad`` in the layout of ``torch.empty_like(x)``, which the fake implementation promises (the kernels
    allocate it that way; the reference returns slices). An unused gradient comes back as zeros."""
    out = torch.empty_like(x)
    if grad is None:
        return out.zero_()
    if grad.stride() == out.stride() and grad.storage_offset() == 0:
        return grad
    return out.copy_(grad)


@_prefix_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, out,
      lse, causal, scale, dropout_p, backend, deterministic, bias_grad):
    grads = tuple(torch.empty_like(x) for x in (q, k, v, prefix_k, prefix_v))
    grad_bias = _bias_grad_buffer(q, attn_bias, bias_grad)
    return (*grads, grad_bias.to(attn_bias.dtype) if grad_bias.numel() else grad_bias)


_BIAS_INPUT = 8  # the position of attn_bias among the forward op's inputs


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal, scale, dropout_p,
     backend, deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed,
                          out, lse)
    ctx.options = (causal, scale, dropout_p, backend, deterministic)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    bias_grad = attn_bias is not None and ctx.needs_input_grad[_BIAS_INPUT]
    *grads, grad_bias = torch.ops.ptv2_kernels.prefix_attention_backward(
        grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed,
        out, lse, *ctx.options, bias_grad)
    return (*grads, None, None, None, grad_bias if bias_grad else None, None, None, None, None, None, None)


torch.library.register_autograd("ptv2_kernels::prefix_attention", _backward, setup_context=_setup_context)
