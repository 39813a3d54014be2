"""The native backend: prefix attention on PyTorch's own fused attention kernels, split in two and merged.

Attention over ``[prefix ; sequence]`` is the log-sum-exp weighted merge of attention over the prefix and attention
over the sequence: with per-part outputs ``o_s, o_p`` and log-sum-exps ``l_s, l_p``,

    l = logaddexp(l_s, l_p),    o = exp(l_s - l) * o_s + exp(l_p - l) * o_p.

Each part runs on torch's fused CPU attention (``aten._scaled_dot_product_flash_attention_for_cpu``), which returns
its log-sum-exp. The backward is exact: each part's fused backward, called with the **merged** output and
log-sum-exp, computes that part's share of the softmax gradient (its probabilities are ``exp(s - l)`` and its row
term ``rowsum(dO * o)`` is the merged one). Nothing of the size of the concatenated keys/values is ever written:
the sequence keys/values are read in place (grouped-query heads by the kernel itself), a batch-shared prefix is
read through a stride-0 view, and a bank's entries are gathered per sample (``[B, Hkv, P, D]``, the prefix only).

The lse's own gradient (``return_lse=True`` with a loss on lse) adds ``p_j * g`` to each score's gradient; it is
computed with one more fused forward (the probabilities applied to the keys, for dQ) and backward (for dK) per
part, only when that gradient is present.

Two things torch's fused CPU kernels cannot do — dropout, and the gradient of an additive score bias — are done
the way torch's own ``scaled_dot_product_attention`` does them on a CPU, by its math composition (matmul,
softmax, dropout, matmul): the prefix scores ``[B, Hq, Nq, P]`` and the sequence scores ``[B, Hq, Nq, Nk]`` are
laid side by side in one score matrix (one softmax, one log-sum-exp, one dropout), each part's matmuls reading
their columns in place; grouped-query heads multiply their key/value head without a copy, and the dropout mask is
drawn from the call's seed in the layout the reference draws it (``[B, Hq, Nq, P + Nk]``, prefix columns first),
so that a call with dropout equals the reference backend's with the same seed. The op's backward is written out
(the custom op runs with autograd off), the bias gradient being the sequence columns' score gradient; in eager mode
autograd records the composition instead (:func:`differentiable_forward`), and its backward, which keeps the
forward's probabilities and mask as torch's own SDPA does, runs in autograd's engine. Still nothing of the size of
the concatenated keys/values is written: the scores are the math composition's own.

A model hands every layer the same mask and index tensors, so what the parts derive from them (the additive
masks, which rows see a key) is derived once and remembered for the following calls (see :func:`_remembered`).

The call a model makes at every layer (both parts have keys, no dropout, no bias gradient, no lse gradient) runs
its forward and backward in C++ where the extension ``ptv2_kernels._native`` is built (``csrc/native/``: the same
two fused calls and the same merge formula, without the per-call Python work); :func:`host_path` says which.

What the backend cannot do is stated in :func:`unsupported_reasons` (other devices, other dtypes), and ``auto``
then falls back to the reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import weakref
from typing import Optional

import torch
from torch import Tensor

from ._memo import Memo
from .call import Call
from .reference import seeded_generator

__all__ = ["forward", "backward", "unsupported_reasons", "host_path", "DTYPES"]

# The score options it computes (backends.NativeBackend states why not the others).
SCORE_OPTIONS = ("window_size",)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The forward through its Python binding, which skips torch.ops' per-call cost (about 4 us a call, twice per layer
# per step); the backward has no such binding.
_fused = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu",
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
_fused_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _load_compiled():
    """(the extension ptv2_kernels._native, None), or (None, why it is not used)."""
    try:
        if importlib.util.find_spec("ptv2_kernels._native") is None:
            return None, "the extension ptv2_kernels._native is not built"
        return importlib.import_module("ptv2_kernels._native"), None
    except Exception as error:  # noqa: BLE001 - an ABI or loader error: report it, keep the Python path
        return None, f"the extension ptv2_kernels._native does not load ({type(error).__name__}: {error})"


# None: every call runs from Python (the tests set it so to compare the two paths).
_compiled, _compiled_problem = _load_compiled()


def host_path() -> str:
    """Where the common calls' host work runs: "C++ (ptv2_kernels._native)" or "Python (<why not C++>)"."""
    if _compiled is not None:
        return "C++ (ptv2_kernels._native)"
    return f"Python ({_compiled_problem or 'the compiled path is switched off'})"


def _compiled_serves(q: Tensor, k: Tensor, prefix_k: Tensor) -> bool:
    """Whether the compiled path serves a call without dropout: both parts have keys and there are queries."""
    return _compiled is not None and k.shape[2] > 0 and prefix_k.shape[2] > 0 and q.numel() > 0


def _compiled_masks(q, k, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias, causal, window_size):
    """The compiled path's mask arguments: the prefix part's (mask, rows seeing) and the sequence part's (mask,
    kernel causal flag, rows seeing), derived as for the Python path."""
    return (*_prefix_masks(q, prefix_k, prefix_index, prefix_lengths),
            *_sequence_mask(q, k, attn_mask, attn_bias, causal, window_size))


def _prefix_masks(q, prefix_k, prefix_index, prefix_lengths):
    """The prefix part's (additive mask, rows seeing), as :func:`_prefix_part` derives them."""
    if prefix_lengths is None:
        return None, None
    return _remembered(_prefix_length_part, (prefix_lengths, prefix_index), _mask_dtype(q), q.shape[0],
                       prefix_k.shape[2])


def unsupported_reasons(q: Tensor, prefix_k: Tensor, dropout_p: float, attn_bias: Optional[Tensor],
                        bias_grad: bool) -> list[str]:
    """Every reason the native backend cannot serve a call (empty: it can)."""
    reasons = []
    if not q.is_cpu:
        reasons.append(f"it runs torch's fused CPU attention, got tensors on {q.device}")
    if q.dtype not in DTYPES:
        reasons.append(f"it supports q/k/v of dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    if prefix_k.dtype not in DTYPES:
        reasons.append(f"it supports prefix_k/prefix_v of a floating dtype of {DTYPES}, got {prefix_k.dtype}")
    return reasons


# ----------------------------------------------------------------------------------------------------------------
# The two parts' masks
# ----------------------------------------------------------------------------------------------------------------

def _compact(t: Tensor) -> Tensor:
    """A broadcast view (stride 0 along expanded dims) narrowed back to size 1 there: the same values, no copy."""
    index = tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None) for size, stride in zip(t.shape, t.stride()))
    return t[index]


def _mask_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _sequence_mask(q, k, attn_mask, attn_bias, causal, window_size=None):
    """(additive float mask or None, the kernel's is_causal, [B|1, H|1, Nq] rows that see some key or None).

    The kernel's own causal rule is top-left aligned and takes no mask with it, so it serves only a square causal
    call without other masks; every other causal call gets the bottom-right rule in the mask. The fused kernel
    gives a row that sees no key lse = 0 (not -inf), so such rows are found from the mask.
    """
    q_len, k_len = q.shape[2], k.shape[2]
    if causal and q_len == 1:  # bottom-right aligned, a single query (a decode step) sees every key
        causal = False
    if attn_mask is None and attn_bias is None and window_size is None:
        if not causal or q_len == k_len:
            return None, causal, None
        rows = torch.arange(q_len, device=q.device)[:, None]
        visible = torch.arange(k_len, device=q.device)[None, :] <= rows + (k_len - q_len)
        mask = torch.zeros(q_len, k_len, dtype=_mask_dtype(q), device=q.device).masked_fill_(~visible, float("-inf"))
        return mask, False, visible.any(-1)
    if attn_bias is None and not causal and window_size is None and attn_mask.dim() == 2:
        mask, rows_seeing = _remembered(_key_padding_part, (attn_mask,), _mask_dtype(q))
        return mask, False, rows_seeing
    mask = torch.zeros((), dtype=_mask_dtype(q), device=q.device)
    if attn_bias is not None:
        mask = mask + _compact(attn_bias).to(mask.dtype)
    if attn_mask is not None:
        visible = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else _compact(attn_mask)
        mask = mask.masked_fill(~visible, float("-inf"))
    if causal or window_size is not None:
        position = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)  # bottom-right aligned
        cols = torch.arange(k_len, device=q.device)[None, :]
        hidden = cols > position if causal else torch.zeros_like(cols, dtype=torch.bool)
        if window_size is not None:
            left, right = window_size
            if left >= 0:
                hidden = hidden | (cols < position - left)
            if right >= 0:
                hidden = hidden | (cols > position + right)
        mask = mask.masked_fill(hidden, float("-inf"))
    while mask.dim() < 4:
        mask = mask[None]
    rows_seeing = (mask > float("-inf")).any(-1)
    return mask, False, rows_seeing


def _prefix_part(q, prefix_k, prefix_v, prefix_index, prefix_lengths, broadcast=False):
    """(keys, values [B, Hkv, P, D] in q's dtype, additive mask [B, 1, 1, P] or None, [B, 1, 1] rows that see a
    prefix key or None). ``broadcast``: a batch-shared prefix stays [1, Hkv, P, D] (matmul broadcasts it)."""
    batch = q.shape[0]
    if prefix_index is None and broadcast:
        keys, values = prefix_k, prefix_v
    elif prefix_index is None:
        # (-1 keeps a size: cheaper than passing the sizes, this runs per layer per step)
        keys, values = prefix_k.expand(batch, -1, -1, -1), prefix_v.expand(batch, -1, -1, -1)
    else:
        keys, values = torch.index_select(prefix_k, 0, prefix_index), torch.index_select(prefix_v, 0, prefix_index)
    if keys.dtype != q.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    if prefix_lengths is None:
        return keys, values, None, None
    mask, rows_seeing = _remembered(_prefix_length_part, (prefix_lengths, prefix_index), _mask_dtype(q), batch,
                                    prefix_k.shape[2])
    return keys, values, mask, rows_seeing


def _prefix_length_part(prefix_lengths, prefix_index, dtype, batch, prefix_len):
    """(additive mask [B, 1, 1, P] hiding each sample's slots past its entry's length, [B, 1, 1] rows that see a
    prefix key)."""
    lengths = prefix_lengths.long()
    lengths = lengths.expand(batch) if prefix_index is None else lengths[prefix_index.long()]
    lengths = lengths.clamp(0, prefix_len)
    slots = torch.arange(prefix_len, device=prefix_lengths.device)
    mask = torch.zeros(batch, 1, 1, prefix_len, dtype=dtype, device=prefix_lengths.device)
    mask.masked_fill_(slots[None, None, None, :] >= lengths[:, None, None, None], float("-inf"))
    seeing = lengths > 0
    return mask, None if bool(seeing.all()) else seeing[:, None, None]


def _key_padding_part(attn_mask, dtype):
    """(additive mask [B, 1, 1, Nk] or None where every key is visible, [B, 1, 1] rows that see a key or None
    where every sample sees one) of a key-padding mask [B, Nk]. A CPU backend reads the mask for free: an
    all-visible mask is dropped, so the fused kernel runs without one, and the merge checks for rows that see
    nothing only where a sample has no visible key."""
    if bool(attn_mask.all()):
        return None, None
    visible = attn_mask[:, None, None, :]
    mask = torch.zeros(visible.shape, dtype=dtype, device=attn_mask.device).masked_fill_(~visible, float("-inf"))
    seeing = visible.any(-1)
    return mask, None if bool(seeing.all()) else seeing


class _IdOf:
    """A weak reference to a tensor that returns its id while it lives (None once freed): ids compare cheaply."""

    __slots__ = ("_ref", "_id")

    def __init__(self, t: Tensor):
        self._ref, self._id = weakref.ref(t), id(t)

    def __call__(self):
        return self._id if self._ref() is not None else None


# A model hands every layer the same mask and index tensors: what the parts derive from them (the additive masks,
# the rows that see a key) is remembered for the next calls, keyed by the tensors (by weak reference: a freed
# tensor's id may be reused) and their versions (an in-place write bumps it). Inference tensors have no version:
# theirs is derived every time.
_remembered_parts = Memo(capacity=8)


def _remembered(derive, tensors, *arguments):
    """``derive(*tensors, *arguments)``, remembered for the same (live, unmodified) tensors and arguments."""
    key, anchors, versions = [derive], [], []
    for t in tensors:
        if t is None:
            key.append(None)
            continue
        if t.is_inference():
            return derive(*tensors, *arguments)
        # A view made afresh for each call (a model's mask[:, 0]) is known by its base and where it looks in it.
        anchor = t if t._base is None else t._base
        key.append((id(anchor), t.storage_offset(), t.shape, t.stride()))
        anchors.append(anchor)
        versions.append(t._version)
    key = (*key, *arguments)
    hit = _remembered_parts.get(key)
    if hit is not None and hit[1] == versions and [ref() for ref in hit[0]] == [id(t) for t in anchors]:
        return hit[2]
    value = derive(*tensors, *arguments)
    _remembered_parts.put(key, ([_IdOf(t) for t in anchors], versions, value))
    return value


def _part_lse(lse: Tensor, rows_seeing: Optional[Tensor]) -> Tensor:
    return lse if rows_seeing is None else lse.masked_fill(~rows_seeing, float("-inf"))


# ----------------------------------------------------------------------------------------------------------------
# The backend interface
# ----------------------------------------------------------------------------------------------------------------

def forward(call: Call):
    call.require_only("native", SCORE_OPTIONS)
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal, scale, \
        dropout_p = call[:13]
    window_size = call.window_size
    if dropout_p == 0.0 and _compiled_serves(q, k, prefix_k):
        if attn_mask is not None and attn_mask.dim() == 2 and attn_bias is None and window_size is None and (
                not causal or q.shape[2] == 1):
            # key padding alone (a model's, new each step): the extension reads it as it is
            return _compiled.forward(q, k, v, prefix_k, prefix_v, prefix_index,
                                     *_prefix_masks(q, prefix_k, prefix_index, prefix_lengths), None, False, None,
                                     scale, attn_mask)
        return _compiled.forward(q, k, v, prefix_k, prefix_v, prefix_index,
                                 *_compiled_masks(q, k, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias,
                                                  causal, window_size), scale)
    batch, q_heads, q_len, head_dim = q.shape
    # [B, Nq, Hq, D] memory viewed as [B, Hq, Nq, D], made in one call
    out = torch.empty_strided((batch, q_heads, q_len, head_dim), (q_len * q_heads * head_dim, head_dim,
                                                                   q_heads * head_dim, 1), dtype=q.dtype,
                              device=q.device)
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    parts = _parts(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, causal,
                   window_size)
    if dropout_p > 0.0 and parts:
        merged, merged_lse = _Composed(q, parts, scale, dropout_p, seed).forward()
        out.copy_(merged)
        lse.copy_(merged_lse)
    else:
        _merged_forward(q, parts, scale, out, lse)
    return out, lse


def common_inference_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale) -> Optional[Tensor]:
    """``out`` of the call a model makes at every layer of inference, in one step, or None where the op's full path
    must serve it: the op's arguments as given (ops.py has not checked them), no index, no lengths, no option but a
    key-padding mask, nothing needing a gradient. The extension checks what ops.py would and hands the call to this
    backend's compiled forward as :func:`forward` would; every call it declines (an invalid argument among them)
    takes the full path, which checks, raises or computes it. Plain tensors outside torch.compile, functorch
    transforms and dispatch modes only: those see the registered custom op."""
    compiled = _compiled
    if compiled is None or not (causal is True or causal is False) or not (scale is None or type(scale) is float):
        return None
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor or type(prefix_k) is not Tensor \
            or type(prefix_v) is not Tensor or (key_padding_mask is not None and type(key_padding_mask) is not Tensor):
        return None
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() \
            or torch._C._len_torch_dispatch_stack() > 0:
        return None
    return compiled.common_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)


def differentiable_forward(call: Call, bias_grad: bool = False, need_lse: bool = True):
    """(out, lse) as :func:`forward` gives them, made of differentiable torch operations for autograd to record,
    or None where the fused parts serve the call better.

    With dropout or a bias that needs a gradient this backend computes by torch's math composition
    (:class:`_Composed`), whose backward in :func:`backward` recomputes the probabilities and runs a few dozen
    small operations from Python. In eager mode autograd can differentiate the composition itself instead: its
    backward then runs in autograd's engine on what the forward kept (the probabilities and the dropout mask, as
    torch's SDPA keeps them on a CPU). The formulas and the dropout mask (drawn from ``seed``) are the same; the
    rounding of the gradients may differ in the last bits. ``need_lse`` False: the lse comes back as None."""
    call.require_only("native", SCORE_OPTIONS)
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal, scale, \
        dropout_p = call[:13]
    window_size = call.window_size
    if (dropout_p == 0.0 and not bias_grad) or q.numel() == 0 or k.shape[2] == 0 or prefix_k.shape[2] == 0:
        return None  # (without one of the parts an input would get no gradient at all, not zeros)
    parts = _parts(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, causal,
                   window_size, broadcast=True)
    out, lse = _Composed(q, parts, scale, dropout_p, seed).forward(need_lse)
    # the op's layout: [B, Nq, Hq, Dv] memory viewed as [B, Hq, Nq, Dv], in q's dtype; the lse in float32
    return (_as(out, q.dtype).transpose(1, 2).contiguous().transpose(1, 2),
            None if lse is None else _as(lse, torch.float32))


def _merged_forward(q, parts, scale, out=None, lse=None):
    """The merged output and lse of the parts' fused forwards, written into ``out`` and ``lse`` when given (else
    new tensors: the output in q's dtype, the lse in float32, float64 for float64 inputs).

    With two parts the prefix part's weight exp(l_p - l) is sigmoid(l_p - l_s), and the merge is one lerp from
    the sequence part's output towards the prefix part's, written straight into the output's layout."""
    if out is None:
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:3], dtype=_mask_dtype(q))
    results = []
    for keys, values, mask, kernel_causal, rows_seeing in parts:
        part_out, part_lse = _fused(q, keys, values, 0.0, kernel_causal, attn_mask=mask, scale=scale)
        results.append((part_out, _part_lse(part_lse, rows_seeing)))
    if not results:  # no key at all (P = 0 and Nk = 0)
        return out.zero_(), lse.fill_(float("-inf"))
    if len(results) == 1:
        (part_out, part_lse), = results
        out.copy_(part_out)
        lse.copy_(part_lse)
    else:
        (prefix_out, prefix_lse), (sequence_out, sequence_lse) = results
        prefix_weight = torch.sub(prefix_lse, sequence_lse).sigmoid_().unsqueeze_(-1)  # in place: no new view
        if out.dtype == prefix_weight.dtype:
            torch.lerp(sequence_out, prefix_out, prefix_weight, out=out)  # both parts are in q's dtype
        else:  # float16/bfloat16: merged in float32, rounded once
            out.copy_(torch.lerp(sequence_out.float(), prefix_out.float(), prefix_weight))
        if lse.dtype == prefix_lse.dtype:
            torch.logaddexp(prefix_lse, sequence_lse, out=lse)
        else:  # float64 inputs: the op's lse is float32
            lse.copy_(torch.logaddexp(prefix_lse, sequence_lse))
    if _may_see_nothing(parts):
        # a row that sees no key of either part: its weight is NaN (-inf - -inf); its output is 0, its lse -inf
        sees_nothing = torch.isneginf(lse)
        if sees_nothing.any():  # a CPU backend: the check costs no device synchronization
            out.masked_fill_(sees_nothing.unsqueeze(-1), 0.0)
    return out, lse


def _parts(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, causal, window_size=None,
           broadcast=False):
    """The parts a call splits into, each (keys, values, mask, kernel causal flag, rows that see a key): the
    prefix (when it has keys) and the sequence (when it has keys). ``broadcast``: a batch-shared prefix is not
    expanded to the batch (for the composition's matmuls, not the fused kernels)."""
    parts = []
    if prefix_k.shape[2] > 0:
        keys, values, mask, rows_seeing = _prefix_part(q, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                                       broadcast)
        parts.append((keys, values, mask, False, rows_seeing))
    if k.shape[2] > 0:
        mask, kernel_causal, rows_seeing = _sequence_mask(q, k, attn_mask, attn_bias, causal, window_size)
        parts.append((k, v, mask, kernel_causal, rows_seeing))
    return parts


def _may_see_nothing(parts) -> bool:
    """Whether some row may see no key of a part (its rows_seeing is given)."""
    for part in parts:
        if part[4] is not None:
            return True
    return False


def _merge_weights(lses):
    """The merged lse and each part's weight exp(l_part - l) (0 where a row sees no key at all)."""
    if not lses:
        return None, []
    merged = lses[0] if len(lses) == 1 else torch.logaddexp(lses[0], lses[1])
    finite = torch.isfinite(merged)
    shift = merged.masked_fill(~finite, 0.0)
    return merged, [torch.exp(part - shift).masked_fill(~finite, 0.0) for part in lses]


def backward(grad_out, grad_lse, call: Call, out, lse, *, grad_bias=None):
    call.require_only("native", SCORE_OPTIONS)
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, seed, causal, scale, \
        dropout_p = call[:13]
    window_size = call.window_size
    if dropout_p == 0.0 and grad_bias is None and grad_lse is None and _compiled_serves(q, k, prefix_k):
        return _compiled.backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index,
                                  *_compiled_masks(q, k, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias,
                                                   causal, window_size), out, lse, scale)
    parts = _parts(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, causal,
                   window_size)
    # what no part writes: the sequence's gradients without sequence keys, the prefix's without prefix keys
    dk, dv = (torch.zeros_like(k), torch.zeros_like(v)) if k.shape[2] == 0 or q.numel() == 0 else (None, None)
    d_prefix = [torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)] if prefix_k.shape[2] == 0 or q.numel() == 0 \
        else None
    if q.numel() == 0 or not parts:
        return torch.zeros_like(q), dk, dv, *d_prefix
    has_prefix = prefix_k.shape[2] > 0
    if dropout_p > 0.0 or (grad_bias is not None and grad_bias.numel()):
        composed = _Composed(q, parts, scale, dropout_p, seed, sequence_last=k.shape[2] > 0)
        # the saved output is the forward's own where the composition computes in q's dtype (float32, float64)
        saved_out = out if out.dtype == _mask_dtype(q) else None
        dq, part_grads, sequence_score_grad = composed.backward(grad_out, grad_lse, saved_out)
        if grad_bias is not None and grad_bias.numel():  # a non-empty bias has sequence keys: that part's scores
            grad_bias.copy_(sequence_score_grad)
    else:
        dq, part_grads = _fused_part_grads(_in_kernel_layout(_as(grad_out, q.dtype)), grad_lse, q, parts, out, lse,
                                           scale)
    for number, (part_dk, part_dv) in enumerate(part_grads):
        if number == 0 and has_prefix:
            d_prefix = _reduce_prefix((part_dk, part_dv), prefix_index, prefix_k, prefix_v)
        else:
            dk, dv = part_dk, part_dv
    return _as(dq, q.dtype), _as(dk, k.dtype), _as(dv, v.dtype), *d_prefix


def _fused_part_grads(grad_out, grad_lse, q, parts, out, lse, scale):
    """(dq summed over the parts, [(dK, dV) per part]) by each part's fused backward with the merged out and lse."""
    if q.dtype == torch.float64:  # the saved lse is float32: recompute both in full precision
        out, lse = _merged_forward(q, parts, scale)
    out, lse = _as(out, q.dtype), _as(lse, _mask_dtype(q))
    if _may_see_nothing(parts):
        # A row that sees no key has lse = -inf: exp(s - lse) would be NaN; with +inf its probabilities are 0.
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    extra = _lse_gradient_terms(grad_lse, q, parts, scale) if grad_lse is not None else None
    dq, part_grads = None, []
    for number, (keys, values, mask, kernel_causal, _) in enumerate(parts):
        part_dq, part_dk, part_dv = _fused_backward(grad_out, q, keys, values, out, lse, 0.0, kernel_causal,
                                                    attn_mask=mask, scale=scale)
        # the parts' dq summed in float32 (float64), each fused backward's result being a fresh tensor
        dq = _as(part_dq, _mask_dtype(q)) if dq is None else dq.add_(part_dq)
        if extra is not None:
            dq += extra.dq[number]
            part_dk = part_dk + extra.dk[number]
        part_grads.append((part_dk, part_dv))
    return dq, part_grads


def _in_kernel_layout(grad_out: Tensor) -> Tensor:
    """``grad_out`` in [B, Nq, Hq, D] memory (viewed as [B, Hq, Nq, D]): the fused backward copies it there
    otherwise, once per part."""
    if grad_out.transpose(1, 2).is_contiguous():
        return grad_out
    batch, heads, length, dim = grad_out.shape
    laid_out = grad_out.new_empty(batch, length, heads, dim)
    laid_out.copy_(grad_out.transpose(1, 2))
    return laid_out.transpose(1, 2)


def _reduce_prefix(per_sample, prefix_index, prefix_k, prefix_v):
    """[dK, dV] of the bank: each entry's gradient summed over the samples that used it (in float32, float64 for
    float64, then in the bank's dtype)."""
    reduced = []
    for bank, grad in zip((prefix_k, prefix_v), per_sample):
        accumulate = torch.promote_types(torch.float32, bank.dtype)
        if prefix_index is None:
            total = _as(grad, accumulate).sum(0, keepdim=True)
        else:
            total = torch.zeros(bank.shape, dtype=accumulate, device=bank.device)
            total.index_add_(0, _as(prefix_index, torch.int64), _as(grad, accumulate))
        reduced.append(_as(total, bank.dtype))
    return reduced


class _LseTerms:
    def __init__(self):
        self.dq, self.dk = [], []


def _lse_gradient_terms(grad_lse, q, parts, scale):
    """The gradient that lse's own gradient g adds: each score's gradient gains p_j * g, so dQ gains
    scale * g * sum_j p_j k_j (the probabilities applied to the keys: one fused forward per part, weighted by that
    part's share) and dK gains scale * sum_i g_i p_ij q_i (the dV of a fused backward whose output gradient is
    scale * g * q)."""
    terms = _LseTerms()
    g = grad_lse.to(_mask_dtype(q)).masked_fill(~torch.isfinite(grad_lse), 0)
    results = [_fused(q, keys, keys, 0.0, kernel_causal, attn_mask=mask, scale=scale)
               for keys, _, mask, kernel_causal, _ in parts]
    merged_lse, weights = _merge_weights([_part_lse(part_lse, rows) for (_, part_lse), (*_, rows)
                                          in zip(results, parts)])
    lse_for_backward = merged_lse.masked_fill(merged_lse == float("-inf"), float("inf"))
    upstream = (g.unsqueeze(-1) * q * scale).to(q.dtype)
    # The fused backward's row term rowsum(dO * out) must vanish for its dV to be sum_i p_ij dO_i: out = 0.
    zeros = torch.zeros_like(q)
    for (keys_out, _), weight, (keys, values, mask, kernel_causal, _) in zip(results, weights, parts):
        terms.dq.append(scale * (g * weight).unsqueeze(-1) * keys_out.to(weight.dtype))
        _, _, key_grad = _fused_backward(upstream, q, keys, keys, zeros, lse_for_backward, 0.0, kernel_causal,
                                         attn_mask=mask, scale=scale)
        terms.dk.append(key_grad)
    return terms


# ----------------------------------------------------------------------------------------------------------------
# Dropout and the bias gradient: torch's math composition, per part
# ----------------------------------------------------------------------------------------------------------------

class _Composed:
    """The two parts' attention by matmul and softmax in float32 (float64 for float64 inputs), sharing one lse.

    The parts' scores are laid side by side in one ``[B, Hq, Nq, P + Nk]`` matrix (prefix columns first, the
    layout the reference draws its dropout mask in), so one softmax, one lse and one dropout serve both, and each
    part's matmuls read their columns in place. Grouped-query heads: q ``[B, Hq, Nq, D]`` is viewed as
    ``[B, Hkv, G * Nq, D]`` (query head h uses key/value head h // G), so one batched matmul per part serves every
    group with the keys/values read in place. The scale is applied to q once (the scores are then plain
    products, and dK is ``dS^T`` times the scaled q). ``sequence_last``: the last part is the sequence's (it has
    keys), whose score gradient is the bias gradient.
    """

    def __init__(self, q, parts, scale, dropout_p, seed, sequence_last=False):
        self.dtype = _mask_dtype(q)
        self.shape, self.parts, self.scale = q.shape, parts, scale
        self.sequence_last = sequence_last
        batch, heads, q_len, _ = q.shape
        widths = self.widths = [keys.shape[2] for keys, *_ in parts]
        self.columns = [slice(sum(widths[:n]), sum(widths[:n + 1])) for n in range(len(widths))]
        # contiguous where grouped-query heads view it as [B, Hkv, G * Nq, D]
        self.scaled_q = _scaled_contiguous(q, scale, self.dtype, contiguous=any(
            keys.shape[1] != q.shape[1] for keys, *_ in parts))
        self.kept = None  # dropout's kept entries, scaled by 1 / (1 - p); zero where dropped
        if dropout_p > 0.0:
            draw = torch.rand((batch, heads, q_len, sum(widths)), generator=seeded_generator(seed, q.device),
                              device=q.device)
            # the reference's mask (draw >= p), as 0 / 1 in the draw's float32, then scaled: no bool tensor between
            self.kept = _as(draw.ge_(dropout_p), self.dtype).mul_(1.0 / (1.0 - dropout_p))

    @staticmethod
    def _grouped(x, kv_heads):
        """``x`` [B, Hq, Nq, n] (a column slice of a contiguous matrix, or contiguous) as [B, Hkv, G * Nq, n]; x
        itself without groups (under autograd each reshape is one more node)."""
        batch, heads, rows, cols = x.shape
        return x if heads == kv_heads else x.reshape(batch, kv_heads, heads // kv_heads * rows, cols)

    def _ungrouped(self, x):
        """A product [B, Hkv, G * Nq, n] of grouped operands as [B, Hq, Nq, n]."""
        return x if x.shape[1] == self.shape[1] else x.view(*self.shape[:3], x.shape[-1])

    def _probabilities(self, need_lse=True):
        """(the probabilities [B, Hq, Nq, P + Nk], the lse [B, Hq, Nq] with -inf where a row sees no key, or None
        when not ``need_lse``).

        Written out of place, so that autograd can differentiate it (see :func:`differentiable_forward`)."""
        q_len = self.shape[2]
        pieces, seeing = [], []
        for keys, _, mask, kernel_causal, rows_seeing in self.parts:
            part = self._ungrouped(torch.matmul(self._grouped(self.scaled_q, keys.shape[1]),
                                                _as(keys, self.dtype).transpose(-1, -2)))
            if kernel_causal:  # the square causal call the fused kernel takes without a mask
                part = part.masked_fill(torch.ones(q_len, q_len, dtype=torch.bool, device=part.device).triu_(1),
                                        float("-inf"))
            if mask is not None:
                part = part + mask
            pieces.append(part)
            seeing.append(rows_seeing)
        scores = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        if any(rows is None for rows in seeing):  # every row sees a key of some part
            return torch.softmax(scores, -1), torch.logsumexp(scores, -1) if need_lse else None
        # A row that sees no key of any part has only -inf scores, where softmax and logsumexp (and their
        # gradients) give NaN: such rows are computed on zeros instead, then get probabilities 0 and lse -inf.
        sees = seeing[0] if len(seeing) == 1 else seeing[0] | seeing[1]
        hidden = ~sees.unsqueeze(-1)
        scores = scores.masked_fill(hidden, 0.0)
        return (torch.softmax(scores, -1).masked_fill(hidden, 0.0),
                torch.logsumexp(scores, -1).masked_fill(hidden.squeeze(-1), float("-inf")) if need_lse else None)

    def _dropped(self, probs):
        return probs if self.kept is None else probs * self.kept

    def _output(self, dropped):
        out = None
        # one split, not a slice per part: under autograd their backward is one cat, not a zero-filled matrix each
        pieces = dropped.split(self.widths, dim=-1) if len(self.parts) > 1 else (dropped,)
        for piece, (_, values, *_) in zip(pieces, self.parts):
            part = torch.matmul(self._grouped(piece, values.shape[1]), _as(values, self.dtype))
            out = part if out is None else out.add_(part)  # a matmul's result: autograd allows it in place
        return self._ungrouped(out)

    def forward(self, need_lse=True):
        probs, lse = self._probabilities(need_lse)
        return self._output(self._dropped(probs)), lse

    def backward(self, grad_out, grad_lse, out=None):
        """(dq, [(dK, dV) per part], the sequence part's score gradient [B, Hq, Nq, Nk] or None). ``out``: the
        forward's output, whose row term rowsum(dO * out) the backward needs (recomputed when None)."""
        probs, lse = self._probabilities()
        dropped = self._dropped(probs)
        grad_out = _scaled_contiguous(grad_out, 1.0, self.dtype)
        out = self._output(dropped) if out is None else _as(out, self.dtype)
        row_term = (grad_out * out).sum(-1, keepdim=True)
        if grad_lse is not None:  # lse's gradient adds p_j * g to each score's gradient
            g = grad_lse.to(self.dtype).masked_fill(~torch.isfinite(lse) | ~torch.isfinite(grad_lse), 0.0)
            row_term = row_term - g.unsqueeze(-1)
        grad_dropped = torch.cat([
            self._ungrouped(torch.matmul(self._grouped(grad_out, values.shape[1]),
                                         _as(values, self.dtype).transpose(-1, -2))) for _, values, *_ in self.parts],
            dim=-1)
        grad_probs = grad_dropped if self.kept is None else grad_dropped.mul_(self.kept)
        grad_scores = grad_probs.sub_(row_term).mul_(probs)
        dq, grads = None, []
        for columns, (keys, values, *_) in zip(self.columns, self.parts):
            kv_heads = keys.shape[1]
            part_scores = self._grouped(grad_scores[..., columns], kv_heads)
            part_dq = torch.matmul(part_scores, _as(keys, self.dtype))
            dq = part_dq if dq is None else dq.add_(part_dq)
            part_dk = torch.matmul(part_scores.transpose(-1, -2), self._grouped(self.scaled_q, kv_heads))
            part_dv = torch.matmul(self._grouped(dropped[..., columns], kv_heads).transpose(-1, -2),
                                   self._grouped(grad_out, kv_heads))
            grads.append((part_dk, part_dv))
        dq = self._ungrouped(dq).mul_(self.scale)
        score_grad = grad_scores[..., self.columns[-1]] if self.sequence_last else None
        return dq, grads, score_grad


def _scaled_contiguous(x: Tensor, scale: float, dtype: torch.dtype, contiguous: bool = True) -> Tensor:
    """``x * scale`` in ``dtype``, contiguous (whatever x's layout), in one pass: its grouped views are then views.
    Differentiable where x needs a gradient and autograd records (then in up to two passes, in one and in x's
    layout where it need not be ``contiguous``)."""
    if x.requires_grad and torch.is_grad_enabled():
        x = _as(x, dtype)
        x = x.contiguous() if contiguous else x
        return x * scale if scale != 1.0 else x
    result = torch.empty(x.shape, dtype=dtype, device=x.device)
    return torch.mul(x, scale, out=result) if scale != 1.0 else result.copy_(x)


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` without the call where x has that dtype (this runs per part per layer)."""
    return x if x.dtype == dtype else x.to(dtype)
