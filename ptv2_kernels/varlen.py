"""The variable-length op: ``prefix_attention_varlen`` — packed sequences, FlashAttention's varlen convention.

Sequences are packed along one token dim (``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``) and delimited by
cumulative lengths ``cu_seqlens_q/k`` (int32 ``[S + 1]``, starting at 0). Each sequence has its own bank entry
and attends to that entry's prefix and to its own keys only, so a padding-free batch (transformers'
``DataCollatorWithFlattening``) spends no attention on padding and may mix tasks.

The Triton backend has kernels for it (programs over the packed query blocks, the prefix gradient summed over the
sequences in the kernels). ``reference`` and ``native`` run the padded op's implementation one sequence at a
time (:class:`SequenceLoop`): the reference is the oracle of the tests; native is what ``auto`` runs off CUDA.
As for the padded op, a ``torch.library`` custom op with fake implementations lets ``torch.compile`` trace it,
and in eager mode a plain ``autograd.Function`` runs the same bodies.
"""

from __future__ import annotations

import operator
import weakref
from typing import Optional, Union

import torch
from torch import Tensor

from . import backends, ops
from ._memo import Memo
from .call import Call, PackedCall
from .ops import (_check_index_values, _checked_bank, _checked_options, _checked_qkv, _checked_score_options,
                  _checked_window_size, _eager_path_serves, _scale_or_default, _window_ints,
                  _window_or_none)

__all__ = ["prefix_attention_varlen"]


def prefix_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    prefix_index: Optional[Tensor] = None,
    prefix_lengths: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
    deterministic: Optional[bool] = None,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
    window_size: Optional[tuple[int, int]] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Prefix attention over packed variable-length sequences, without padding and without concatenating.

    Args:
        q: ``[total_q, Hq, Dk]`` queries of all sequences, packed; any strides with the last dim contiguous (a
            slice of a packed qkv projection is read in place).
        k, v: ``[total_k, Hkv, Dk]`` keys and ``[total_k, Hkv, Dv]`` values, packed the same way;
            ``Hq % Hkv == 0``. The values' head dim Dv may differ from the keys' (multi-head latent attention).
        prefix_k, prefix_v: ``[T, Hkv, P, Dk]`` / ``[T, Hkv, P, Dv]`` bank of T prefixes, or ``[Hkv, P, Dk]`` /
            ``[Hkv, P, Dv]`` for one; as in :func:`ptv2_kernels.prefix_attention`.
        cu_seqlens_q, cu_seqlens_k: ``[S + 1]`` integer tensors (int32, as FlashAttention's; int64 is converted):
            sequence s has queries ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]`` and keys
            ``cu_seqlens_k[s]:cu_seqlens_k[s + 1]``. Non-decreasing from 0 to ``total_q`` / ``total_k``; empty
            sequences are allowed.
        max_seqlen_q, max_seqlen_k: ints at least the longest sequence's query / key count (dropout numbers its
            random stream as a padded batch of these lengths would).
        prefix_index: ``[S]`` integer tensor: the bank entry of each sequence. None needs T = 1.
        prefix_lengths: ``[T]``: entry t uses its first ``prefix_lengths[t]`` keys.
        causal: causal over each sequence's own keys, aligned bottom-right per sequence (key j visible to query
            i iff ``j <= i + len_k(s) - len_q(s)``); the prefix is always visible.
        scale, dropout_p, backend, deterministic: as in :func:`ptv2_kernels.prefix_attention`. The ``cuda``
            backend has no variable-length kernels and says so; ``auto`` picks Triton on CUDA and torch's fused
            CPU attention, one sequence at a time, elsewhere.
        return_lse: also return the log-sum-exp ``[Hq, total_q]`` (float32; -inf where a query sees no key),
            differentiable.
        softcap, sinks: the score cap and the attention sinks ``[Hq]`` of :func:`ptv2_kernels.prefix_attention`
            (the sinks' gradient sums over all sequences).
        window_size: ``(left, right)``, the sliding window of :func:`ptv2_kernels.prefix_attention`, aligned
            bottom-right per sequence (key j visible to query i iff ``i + len_k(s) - len_q(s) - left <= j <=
            i + len_k(s) - len_q(s) + right``; -1 unbounded); the prefix stays visible.

    Returns:
        ``out`` ``[total_q, Hq, Dv]`` (contiguous, q's dtype), or ``(out, lse)`` with ``return_lse``. Gradients
        flow to q, k, v, prefix_k and prefix_v; each bank entry's gradient is summed over its sequences.
    """
    if backend not in ("auto",) + backends.NAMES:
        raise ValueError(f"backend must be one of {('auto',) + backends.NAMES}, got {backend!r}")
    (q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, prefix_index,
     prefix_lengths) = _checked(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                prefix_index, prefix_lengths, causal, scale, dropout_p)
    softcap, sinks = _checked_score_options(softcap, sinks, q.shape[1], q.device)
    window_size = _checked_window_size(window_size, causal)
    packed = (cu_seqlens_q.numel() - 1, int(max_seqlen_q), int(max_seqlen_k))
    name = backends.choose_for(backend, backends.Problem(q, k, prefix_k, dropout_p, softcap=softcap, sinks=sinks,
                                                         value_dim=v.shape[-1], window_size=window_size,
                                                         packed=packed))
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=q.device)
    grad_needed = ops._any_requires_grad((q, k, v, prefix_k, prefix_v, sinks))
    if deterministic is None:
        deterministic = ops._deterministic(grad_needed)
    inputs = (q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, prefix_index, prefix_lengths, seed,
              int(max_seqlen_q), int(max_seqlen_k), bool(causal), _scale_or_default(scale, q.shape[-1]),
              float(dropout_p), name, bool(deterministic), sinks, softcap, *_window_ints(window_size))
    if ops.EAGER_PATH and _eager_path_serves(inputs[:10] + (sinks,)):
        if grad_needed:
            out, lse = _EagerVarlen.apply(*inputs)
        else:
            out, lse = _forward_body(*inputs)
    else:
        out, lse = torch.ops.ptv2_kernels.prefix_attention_varlen(*inputs)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------

def _checked(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, prefix_index,
             prefix_lengths, causal, scale, dropout_p):
    """Raise TypeError/ValueError naming the bad argument; return the normalized arguments (a 4-D bank, int32
    contiguous cumulative lengths, contiguous index tensors). The values of the device tensors are checked in
    the forward (:func:`_check_cu_seqlens_values`)."""
    _checked_qkv(q, k, v, 3, "[total, H, D] (sequences packed along dim 0)")
    kv_heads, head_dim = k.shape[1], k.shape[2]
    cu_seqlens_q = _checked_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    cu_seqlens_k = _checked_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1} (shapes "
                         f"{list(cu_seqlens_q.shape)} and {list(cu_seqlens_k.shape)})")
    num_seqs = cu_seqlens_q.numel() - 1
    max_seqlen_q, max_seqlen_k = (_checked_length(name, value) for name, value in
                                  (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)))

    prefix_k, prefix_v, prefix_index, prefix_lengths = _checked_bank(prefix_k, prefix_v, prefix_index,
                                                                     prefix_lengths, kv_heads, head_dim, num_seqs,
                                                                     q.device, value_dim=v.shape[-1])
    _checked_options(causal, scale, dropout_p)
    return (q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, prefix_index,
            prefix_lengths)


def _checked_length(name, value) -> int:
    """A non-negative int from an int, a numpy integer or a 0-d integer tensor (FlashAttention's callers pass
    any of them)."""
    if isinstance(value, bool) or isinstance(value, float) or (isinstance(value, Tensor) and (
            value.dim() != 0 or value.is_floating_point() or value.dtype == torch.bool)):
        raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a non-negative int, got {value!r}") from None
    if value < 0:
        raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _checked_cu_seqlens(name, t, device) -> Tensor:
    """Cumulative lengths as the kernels read them: int32, contiguous (an int64 or strided tensor is copied)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 (or int64) tensor, got {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be 1-D [S + 1] (cumulative lengths starting at 0), got shape "
                         f"{list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; all inputs must share a device")
    return t.to(torch.int32).contiguous()


# As for prefix_index, reading the cumulative lengths costs a device synchronization: the last few checked (with
# their versions) are remembered, since every layer of a model gets the same tensors. Inside a CUDA graph capture
# nothing is read; the kernels clamp every sequence to the packed tensors regardless.
_checked_cu = Memo(capacity=8)


def _check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k):
    if cu_seqlens_q.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    cacheable = not (cu_seqlens_q.is_inference() or cu_seqlens_k.is_inference())
    slot = (id(cu_seqlens_q), id(cu_seqlens_k))
    state = (total_q, total_k, max_seqlen_q, max_seqlen_k, cu_seqlens_q._version, cu_seqlens_k._version)
    if cacheable:
        remembered = _checked_cu.get(slot)
        if (remembered is not None and remembered[0]() is cu_seqlens_q and remembered[1]() is cu_seqlens_k
                and remembered[2] == state):
            return
    # One read of the device: first and last entry, smallest and largest step, of both.
    summary = []
    for cu in (cu_seqlens_q, cu_seqlens_k):
        steps = cu.diff() if cu.numel() > 1 else cu.new_zeros(1)
        summary += [cu[0], cu[-1], steps.min(), steps.max()]
    values = torch.stack(summary).tolist()
    for name, (first, last, low, high), total, longest, other in (
            ("cu_seqlens_q", values[:4], total_q, max_seqlen_q, "q"),
            ("cu_seqlens_k", values[4:], total_k, max_seqlen_k, "k")):
        if first != 0:
            raise ValueError(f"{name} must start at 0, got {first}")
        if low < 0:
            raise ValueError(f"{name} must be non-decreasing (cumulative lengths), got a step of {low}")
        if last != total:
            raise ValueError(f"{name} must end at the packed token count of {other} ({total}), got {last}")
        if high > longest:
            raise ValueError(f"max_seqlen_{other} ({longest}) must be at least the longest sequence's length, "
                             f"got a sequence of {high} in {name}")
    if cacheable:
        _checked_cu.put(slot, (weakref.ref(cu_seqlens_q), weakref.ref(cu_seqlens_k), state))


# ----------------------------------------------------------------------------------------------------------------
# Backends without varlen kernels: one sequence at a time
# ----------------------------------------------------------------------------------------------------------------

class SequenceLoop:
    """A padded backend (``forward`` / ``backward`` of :mod:`ptv2_kernels.backends`) run on each packed sequence
    as a batch of one: ``[L, H, D]`` slices viewed as ``[1, H, L, D]`` (no copy), outputs written into their
    rows, each bank entry's gradient summed over its sequences in order (deterministic). It reads the cumulative
    lengths on the host. Dropout draws sequence s's mask from ``seed + s``."""

    def __init__(self, padded):
        self.padded = padded

    @staticmethod
    def _spans(cu_seqlens_q, cu_seqlens_k):
        return list(zip(cu_seqlens_q.tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k.tolist(),
                        cu_seqlens_k[1:].tolist()))

    @staticmethod
    def _sequence(x, start, end):
        return x[start:end].transpose(0, 1).unsqueeze(0)

    @staticmethod
    def _entry(prefix_index, s):
        return None if prefix_index is None else prefix_index[s:s + 1]

    def _padded_call(self, packed: PackedCall, s: int, q_start: int, q_end: int, k_start: int, k_end: int) -> Call:
        """Sequence ``s`` of ``packed`` as a padded call of one sample (its dropout drawn from ``seed + s``)."""
        call = packed.call
        return call._replace(q=self._sequence(call.q, q_start, q_end), k=self._sequence(call.k, k_start, k_end),
                             v=self._sequence(call.v, k_start, k_end), prefix_index=self._entry(call.prefix_index, s),
                             seed=None if call.seed is None else call.seed + s)

    def forward_varlen(self, packed: PackedCall):
        q, v, (cu_seqlens_q, cu_seqlens_k) = packed.call.q, packed.call.v, packed[1:3]
        out = q.new_zeros(*q.shape[:2], v.shape[-1])
        lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
        for s, (q_start, q_end, k_start, k_end) in enumerate(self._spans(cu_seqlens_q, cu_seqlens_k)):
            if q_end == q_start:
                continue
            part, part_lse = self.padded.forward(self._padded_call(packed, s, q_start, q_end, k_start, k_end))
            out[q_start:q_end] = part[0].transpose(0, 1)
            lse[:, q_start:q_end] = part_lse[0]
        return out, lse

    def backward_varlen(self, grad_out, grad_lse, packed: PackedCall, out, lse, grad_sinks=None):
        (q, k, v, prefix_k, prefix_v), (cu_seqlens_q, cu_seqlens_k) = packed.call[:5], packed[1:3]
        grads = [torch.zeros_like(x) for x in (q, k, v)]
        prefix_grads = [torch.zeros(x.shape, dtype=torch.promote_types(torch.float32, x.dtype), device=x.device)
                        for x in (prefix_k, prefix_v)]
        for s, (q_start, q_end, k_start, k_end) in enumerate(self._spans(cu_seqlens_q, cu_seqlens_k)):
            if q_end == q_start:
                continue  # no query: its keys and its prefix get no gradient
            sequence_grad_sinks = None if grad_sinks is None else torch.zeros_like(grad_sinks)
            rows = lambda x: self._sequence(x, q_start, q_end)  # noqa: E731
            part = self.padded.backward(
                rows(grad_out), None if grad_lse is None else grad_lse[:, q_start:q_end].unsqueeze(0),
                self._padded_call(packed, s, q_start, q_end, k_start, k_end),
                rows(out), lse[:, q_start:q_end].unsqueeze(0),
                **({} if grad_sinks is None else {"grad_sinks": sequence_grad_sinks}))
            if grad_sinks is not None:  # summed over the sequences in order
                grad_sinks += sequence_grad_sinks
            for whole, piece, (start, end) in zip(grads, part[:3], ((q_start, q_end), (k_start, k_end),
                                                                  (k_start, k_end))):
                whole[start:end] = piece[0].transpose(0, 1)
            for whole, piece in zip(prefix_grads, part[3:]):
                whole += piece
        return (*grads, *(g.to(x.dtype) for g, x in zip(prefix_grads, (prefix_k, prefix_v))))


def implementation(name: str):
    """The object whose ``forward_varlen`` / ``backward_varlen`` implement backend ``name`` for packed sequences."""
    if name in backends.VARLEN_KERNELS:
        return backends.implementation(name)
    return SequenceLoop(backends.implementation(name))


# ----------------------------------------------------------------------------------------------------------------
# The custom ops and their autograd
# ----------------------------------------------------------------------------------------------------------------

def _forward_body(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, prefix_index, prefix_lengths, seed,
                  max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, backend, deterministic, sinks=None,
                  softcap=None, window_left=-1, window_right=-1):
    _check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    _check_index_values(prefix_index, prefix_k.shape[0], prefix_lengths, prefix_k.shape[2])
    return implementation(backend).forward_varlen(_packed_call(
        q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, prefix_index, prefix_lengths, seed, max_seqlen_q,
        max_seqlen_k, causal, scale, dropout_p, deterministic, sinks, softcap, window_left, window_right))


def _packed_call(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, prefix_index, prefix_lengths, seed,
                 max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, deterministic, sinks, softcap, window_left,
                 window_right) -> PackedCall:
    """The custom op's flat arguments as the :class:`~ptv2_kernels.call.PackedCall` the backends receive."""
    call = Call(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, seed=seed, causal=causal, scale=scale,
                dropout_p=dropout_p, deterministic=deterministic, softcap=softcap, sinks=sinks,
                window_size=_window_or_none(window_left, window_right))
    return PackedCall(call, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def _backward_body(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, prefix_index,
                   prefix_lengths, seed, out, lse, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, backend,
                   deterministic, sinks=None, softcap=None, window_left=-1, window_right=-1):
    """The five input gradients and the sinks' (in their dtype; empty without sinks)."""
    packed = _packed_call(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, prefix_index, prefix_lengths,
                          seed, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, deterministic, sinks, softcap,
                          window_left, window_right)
    buffers = {}
    grad_sinks = q.new_empty(0, dtype=torch.float32)
    if sinks is not None:
        grad_sinks = buffers["grad_sinks"] = q.new_zeros(sinks.shape, dtype=torch.float32)
    grads = implementation(backend).backward_varlen(grad_out, grad_lse, packed, out, lse, **buffers)
    return (*grads, grad_sinks if sinks is None else grad_sinks.to(sinks.dtype))


# sinks, softcap and the window come last, with defaults, as in the padded op.
@torch.library.custom_op("ptv2_kernels::prefix_attention_varlen", mutates_args=())
def _varlen_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    prefix_index: Optional[Tensor], prefix_lengths: Optional[Tensor], seed: Optional[Tensor], max_seqlen_q: int,
    max_seqlen_k: int, causal: bool, scale: float, dropout_p: float, backend: str, deterministic: bool,
    sinks: Optional[Tensor] = None, softcap: Optional[float] = None, window_left: int = -1, window_right: int = -1,
) -> tuple[Tensor, Tensor]:
    return _forward_body(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, prefix_index, prefix_lengths,
                         seed, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, backend, deterministic, sinks,
                         softcap, window_left, window_right)


@_varlen_op.register_fake
def _(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, prefix_index, prefix_lengths, seed, max_seqlen_q,
      max_seqlen_k, causal, scale, dropout_p, backend, deterministic, sinks=None, softcap=None, window_left=-1,
      window_right=-1):
    total, heads, _ = q.shape
    return q.new_empty(total, heads, v.shape[-1]), q.new_empty(heads, total, dtype=torch.float32)


@torch.library.custom_op("ptv2_kernels::prefix_attention_varlen_backward", mutates_args=())
def _varlen_backward_op(
    grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor,
    prefix_v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, prefix_index: Optional[Tensor],
    prefix_lengths: Optional[Tensor], seed: Optional[Tensor], out: Tensor, lse: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, causal: bool, scale: float, dropout_p: float, backend: str, deterministic: bool,
    sinks: Optional[Tensor] = None, softcap: Optional[float] = None, window_left: int = -1, window_right: int = -1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    *grads, grad_sinks = _backward_body(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k,
                                        prefix_index, prefix_lengths, seed, out, lse, max_seqlen_q, max_seqlen_k,
                                        causal, scale, dropout_p, backend, deterministic, sinks, softcap,
                                        window_left, window_right)
    # the layout of empty_like of each input, which the fake implementation promises
    return (*(g if g.stride() == torch.empty_like(x).stride() else torch.empty_like(x).copy_(g)
              for g, x in zip(grads, (q, k, v, prefix_k, prefix_v))), grad_sinks)


@_varlen_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, prefix_index, prefix_lengths,
      seed, out, lse, max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, backend, deterministic, sinks=None,
      softcap=None, window_left=-1, window_right=-1):
    grad_sinks = q.new_empty(0, dtype=torch.float32) if sinks is None else torch.empty_like(sinks)
    return (*(torch.empty_like(x) for x in (q, k, v, prefix_k, prefix_v)), grad_sinks)


_VARLEN_SINKS_INPUT = 17  # the position of sinks among the forward op's inputs


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, prefix_index, prefix_lengths, seed, *options) = inputs
    # a direct call may leave the trailing arguments out
    options, (sinks, softcap, *window) = options[:7], (*options[7:], None, None, -1, -1)[:4]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, prefix_index, prefix_lengths,
                          seed, *output, sinks)
    ctx.options, ctx.softcap, ctx.window, ctx.num_inputs = tuple(options), softcap, tuple(window), len(inputs)


def _backward(ctx, grad_out, grad_lse, backward_fn=None):
    q, k, v, prefix_k, prefix_v, cu_q, cu_k, prefix_index, prefix_lengths, seed, out, lse, sinks = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    *grads, grad_sinks = (backward_fn or torch.ops.ptv2_kernels.prefix_attention_varlen_backward)(
        grad_out, grad_lse, q, k, v, prefix_k, prefix_v, cu_q, cu_k, prefix_index, prefix_lengths, seed, out, lse,
        *ctx.options, sinks, ctx.softcap, *ctx.window)
    result = [*grads] + [None] * (ctx.num_inputs - len(grads))
    if sinks is not None and ctx.needs_input_grad[_VARLEN_SINKS_INPUT]:
        result[_VARLEN_SINKS_INPUT] = grad_sinks
    return tuple(result)


torch.library.register_autograd("ptv2_kernels::prefix_attention_varlen", _backward, setup_context=_setup_context)


class _EagerVarlen(torch.autograd.Function):
    """The op in eager mode without the dispatcher's per-call cost (as ops._EagerPrefixAttention)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_body(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        return _backward(ctx, grad_out, grad_lse, backward_fn=_backward_body)
