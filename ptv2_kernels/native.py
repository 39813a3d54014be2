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

What torch's fused CPU kernels cannot do is stated in :func:`unsupported_reasons` (dropout, a bias gradient, other
devices), and ``auto`` then falls back to the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["forward", "backward", "unsupported_reasons", "DTYPES"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_fused_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def unsupported_reasons(q: Tensor, prefix_k: Tensor, dropout_p: float, attn_bias: Optional[Tensor],
                        bias_grad: bool) -> list[str]:
    """Every reason the native backend cannot serve a call (empty: it can)."""
    reasons = []
    if q.device.type != "cpu":
        reasons.append(f"it runs torch's fused CPU attention, got tensors on {q.device}")
    if q.dtype not in DTYPES:
        reasons.append(f"it supports q/k/v of dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    if prefix_k.dtype not in DTYPES:
        reasons.append(f"it supports prefix_k/prefix_v of a floating dtype of {DTYPES}, got {prefix_k.dtype}")
    if dropout_p > 0.0:
        reasons.append("torch's fused CPU attention has no dropout")
    if attn_bias is not None and bias_grad:
        reasons.append("torch's fused CPU attention gives no gradient for an additive score bias (attn_bias or a "
                       "float attn_mask that requires grad)")
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


def _sequence_mask(q, k, attn_mask, attn_bias, causal):
    """(additive float mask or None, the kernel's is_causal, [B|1, H|1, Nq] rows that see some key or None).

    The kernel's own causal rule is top-left aligned and takes no mask with it, so it serves only a square causal
    call without other masks; every other causal call gets the bottom-right rule in the mask. The fused kernel
    gives a row that sees no key lse = 0 (not -inf), so such rows are found from the mask.
    """
    q_len, k_len = q.shape[2], k.shape[2]
    if attn_mask is None and attn_bias is None:
        if not causal or q_len == k_len:
            return None, causal, None
        rows = torch.arange(q_len, device=q.device)[:, None]
        visible = torch.arange(k_len, device=q.device)[None, :] <= rows + (k_len - q_len)
        mask = torch.zeros(q_len, k_len, dtype=_mask_dtype(q), device=q.device).masked_fill_(~visible, float("-inf"))
        return mask, False, visible.any(-1)
    mask = torch.zeros((), dtype=_mask_dtype(q), device=q.device)
    if attn_bias is not None:
        mask = mask + _compact(attn_bias).to(mask.dtype)
    if attn_mask is not None:
        visible = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else _compact(attn_mask)
        mask = mask.masked_fill(~visible, float("-inf"))
    if causal:
        rows = torch.arange(q_len, device=q.device)[:, None]
        hidden = torch.arange(k_len, device=q.device)[None, :] > rows + (k_len - q_len)
        mask = mask.masked_fill(hidden, float("-inf"))
    while mask.dim() < 4:
        mask = mask[None]
    rows_seeing = (mask > float("-inf")).any(-1)
    return mask, False, rows_seeing


def _prefix_part(q, prefix_k, prefix_v, prefix_index, prefix_lengths):
    """(keys, values [B, Hkv, P, D] in q's dtype, additive mask [B, 1, 1, P] or None, [B, 1, 1] rows that see a
    prefix key or None)."""
    batch = q.shape[0]
    if prefix_index is None:
        keys, values = prefix_k.expand(batch, *prefix_k.shape[1:]), prefix_v.expand(batch, *prefix_v.shape[1:])
    else:
        index = prefix_index.long()
        keys, values = prefix_k[index], prefix_v[index]
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    if prefix_lengths is None:
        return keys, values, None, None
    lengths = prefix_lengths.long()
    lengths = lengths.expand(batch) if prefix_index is None else lengths[prefix_index.long()]
    lengths = lengths.clamp(0, prefix_k.shape[2])
    slots = torch.arange(prefix_k.shape[2], device=q.device)
    mask = torch.zeros(batch, 1, 1, prefix_k.shape[2], dtype=_mask_dtype(q), device=q.device)
    mask.masked_fill_(slots[None, None, None, :] >= lengths[:, None, None, None], float("-inf"))
    return keys, values, mask, (lengths > 0)[:, None, None]


def _part_lse(lse: Tensor, rows_seeing: Optional[Tensor]) -> Tensor:
    return lse if rows_seeing is None else lse.masked_fill(~rows_seeing, float("-inf"))


# ----------------------------------------------------------------------------------------------------------------
# The backend interface
# ----------------------------------------------------------------------------------------------------------------

def forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed, causal, scale, dropout_p, *,
            attn_bias=None):
    batch, q_heads, q_len, head_dim = q.shape
    out = q.new_empty(batch, q_len, q_heads, head_dim).transpose(1, 2)
    lse = q.new_empty(batch, q_heads, q_len, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    merged, merged_lse = _merged_forward(
        q, _parts(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, causal), scale)
    out.copy_(merged)
    lse.copy_(merged_lse)
    return out, lse


def _merged_forward(q, parts, scale):
    """The merged output (float32, float64 for float64 inputs) and lse of the parts' fused forwards."""
    outs, lses = [], []
    for keys, values, mask, kernel_causal, rows_seeing in parts:
        part_out, part_lse = _fused(q, keys, values, 0.0, kernel_causal, attn_mask=mask, scale=scale)
        outs.append(part_out)
        lses.append(_part_lse(part_lse, rows_seeing))
    merged_lse, weights = _merge_weights(lses)
    if merged_lse is None:  # no key at all (P = 0 and Nk = 0)
        return q.new_zeros(q.shape, dtype=_mask_dtype(q)), q.new_full(q.shape[:3], float("-inf"), dtype=_mask_dtype(q))
    merged = sum(w.unsqueeze(-1) * o.to(w.dtype) for w, o in zip(weights, outs))
    return merged, merged_lse


def _parts(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, causal):
    """The parts a call splits into, each (keys, values, mask, kernel causal flag, rows that see a key): the
    prefix (when it has keys) and the sequence (when it has keys)."""
    parts = []
    if prefix_k.shape[2] > 0:
        keys, values, mask, rows_seeing = _prefix_part(q, prefix_k, prefix_v, prefix_index, prefix_lengths)
        parts.append((keys, values, mask, False, rows_seeing))
    if k.shape[2] > 0:
        mask, kernel_causal, rows_seeing = _sequence_mask(q, k, attn_mask, attn_bias, causal)
        parts.append((k, v, mask, kernel_causal, rows_seeing))
    return parts


def _merge_weights(lses):
    """The merged lse and each part's weight exp(l_part - l) (0 where a row sees no key at all)."""
    if not lses:
        return None, []
    merged = lses[0] if len(lses) == 1 else torch.logaddexp(lses[0], lses[1])
    finite = torch.isfinite(merged)
    shift = merged.masked_fill(~finite, 0.0)
    return merged, [torch.exp(part - shift).masked_fill(~finite, 0.0) for part in lses]


def backward(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed, out,
             lse, causal, scale, dropout_p, deterministic, *, attn_bias=None, grad_bias=None):
    if grad_bias is not None and grad_bias.numel():
        raise ValueError("the native backend computes no attn_bias gradient (the op does not choose it then)")
    dq = torch.zeros(q.shape, dtype=_mask_dtype(q), device=q.device)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    d_prefix = [torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)]
    if q.numel() == 0:
        return dq.to(q.dtype), dk, dv, *d_prefix
    grad_out = grad_out.to(q.dtype)
    has_prefix = prefix_k.shape[2] > 0
    parts = _parts(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, attn_bias, causal)
    if q.dtype == torch.float64:  # the saved lse is float32: recompute both in full precision
        out, lse = _merged_forward(q, parts, scale)
    out, lse = out.to(q.dtype), lse.to(_mask_dtype(q))
    # A row that sees no key has lse = -inf: exp(s - lse) would be NaN; with +inf its probabilities are 0.
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    extra = _lse_gradient_terms(grad_lse, q, parts, scale) if grad_lse is not None else None
    for number, (keys, values, mask, kernel_causal, _) in enumerate(parts):
        part_dq, part_dk, part_dv = _fused_backward(grad_out, q, keys, values, out, lse, 0.0, kernel_causal,
                                                    attn_mask=mask, scale=scale)
        dq += part_dq
        if extra is not None:
            dq += extra.dq[number]
            part_dk = part_dk + extra.dk[number]
        if number == 0 and has_prefix:
            _reduce_prefix(d_prefix, (part_dk, part_dv), prefix_index, prefix_k.shape[0])
        else:
            dk, dv = part_dk, part_dv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *d_prefix


def _reduce_prefix(d_prefix, per_sample, prefix_index, num_prefixes):
    """Each bank entry's gradient: the sum over the samples that used it (float32 or float64, then its dtype)."""
    for target, grad in zip(d_prefix, per_sample):
        accumulate = torch.promote_types(torch.float32, target.dtype)
        if prefix_index is None:
            target.copy_(grad.to(accumulate).sum(0, keepdim=True))
        else:
            total = torch.zeros(target.shape, dtype=accumulate, device=target.device)
            total.index_add_(0, prefix_index.long(), grad.to(accumulate))
            target.copy_(total)


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
