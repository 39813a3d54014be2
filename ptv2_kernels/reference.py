"""The oracle: prefix attention computed the obvious way.

Everything the fused kernels avoid happens here on purpose: the prefix is gathered per sample, concatenated in
front of the sequence keys/values, repeated over the query heads of each key/value head, and a full score matrix
is masked and soft-maxed in float32 (or float64). It is short enough to check by eye against the contract in
docs/design.md §4, and autograd gives its gradients for free, so every test and benchmark compares against it.
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import torch
from torch import Tensor

__all__ = ["attention_ref", "attention_ref_backward", "attention_ref_varlen", "seeded_generator"]


# One generator per device and thread, seeded afresh for each call: making one costs microseconds, and a thread's
# own cannot be reseeded by another between its seeding and its draw.
_GENERATORS = threading.local()


def seeded_generator(seed: Tensor, device: torch.device) -> torch.Generator:
    """The generator a call's dropout mask is drawn from: one of ``device``, seeded with ``seed`` (the call's
    dropout seed, an integer tensor). The reference backend and native draw their masks from it, in forward and
    again in backward; it is shared by the calls of a thread, so draw from it before the next call seeds it."""
    generators = _GENERATORS.__dict__
    generator = generators.get(device)
    if generator is None:
        generator = generators[device] = torch.Generator(device=device)
    return generator.manual_seed(int(seed))


def attention_ref(
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
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
    prefix_bias: Optional[Tensor] = None,
    window_size: Optional[tuple[int, int]] = None,
    dropout_p: float = 0.0,
    dropout_keep: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """Attention of q over ``[prefix_k[prefix_index[b], :, :L] ; k]``, returned as ``(out, lse)``.

    Takes the arguments of :func:`ptv2_kernels.prefix_attention` (checked by the caller; ``attn_mask`` and
    ``attn_bias`` broadcast to ``[B, Hq, Nq, Nk]`` by torch's rules, a float ``attn_mask`` adds to the scores),
    plus:

    * ``dropout_keep``: a bool tensor ``[B, Hq, Nq, P + Nk]`` that says which probabilities survive dropout
      (columns ``0..P-1`` are the prefix slots, the rest the sequence keys). Tests pass the mask a kernel used, so
      that a kernel with dropout can be compared exactly; without it a mask is drawn from ``generator``.
    * ``compute_dtype``: the precision of the whole computation; float32 by default (float64 for float64 inputs).
      Pass ``q.dtype`` for the same-precision PyTorch computation that bounds a kernel's error in the tests.

    ``softcap`` caps the scaled scores ``s`` of every key (prefix and sequence) to ``softcap * tanh(s / softcap)``
    before the additive terms and masks (Gemma2); ``sinks`` ``[Hq]`` are one logit per query head that joins each
    row's softmax denominator and is then dropped (GPT-OSS): ``p_j = exp(s_j) / (sum_i exp(s_i) + exp(sink))``,
    and the lse includes it (a row that sees no key then has lse = sink and output 0). ``prefix_bias``, broadcastable
    to ``[B, Hq, Nq, P]``, is added to the prefix columns' scores as ``attn_bias`` is to the sequence columns'.
    ``window_size = (left, right)`` hides the sequence keys outside query i's window
    ``[i + Nk - Nq - left, i + Nk - Nq + right]`` (-1: unbounded on that side); the prefix keys stay visible.

    ``out`` is ``[B, Hq, Nq, Dv]`` (v's head dim, which may differ from q's and k's Dk; the default scale is
    ``1 / sqrt(Dk)``) and ``lse`` (natural log, -inf for a query that sees no key) ``[B, Hq, Nq]``, both in
    ``compute_dtype``.
    """
    keys, values, probs, lse, scale, _ = _attention_probs(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_mask, attn_bias, causal,
        scale, compute_dtype, softcap, sinks, prefix_bias, window_size)
    keep = _dropout_keep(probs, dropout_p, dropout_keep, generator)
    return torch.matmul(_dropped(probs, keep, dropout_p), values), lse


def attention_ref_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    prefix_index: Optional[Tensor] = None,
    prefix_lengths: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
    window_size: Optional[tuple[int, int]] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """:func:`attention_ref` of each packed sequence on its own: the oracle of
    :func:`ptv2_kernels.prefix_attention_varlen` (differentiable by autograd).

    ``q [total_q, Hq, Dk]``, ``k [total_k, Hkv, Dk]``, ``v [total_k, Hkv, Dv]``, sequence s in rows
    ``cu_seqlens[s]:cu_seqlens[s + 1]``, bank entry ``prefix_index[s]``. Returns ``out [total_q, Hq, Dv]`` and
    ``lse [Hq, total_q]`` in ``compute_dtype``."""
    dtype = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(bounds_q) - 1):
        (q_start, q_end), (k_start, k_end) = bounds_q[s:s + 2], bounds_k[s:s + 2]
        out, lse = attention_ref(
            q[q_start:q_end].transpose(0, 1)[None], k[k_start:k_end].transpose(0, 1)[None],
            v[k_start:k_end].transpose(0, 1)[None], prefix_k, prefix_v,
            prefix_index=None if prefix_index is None else prefix_index[s:s + 1], prefix_lengths=prefix_lengths,
            causal=causal, scale=scale, softcap=softcap, sinks=sinks, window_size=window_size, compute_dtype=dtype)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:
        return q.new_zeros(*q.shape[:2], v.shape[-1], dtype=dtype), q.new_zeros(q.shape[1], 0, dtype=dtype)
    return torch.cat(outs), torch.cat(lses, dim=1)


def attention_ref_backward(
    grad_out: Tensor,
    grad_lse: Optional[Tensor],
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
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
    prefix_bias: Optional[Tensor] = None,
    window_size: Optional[tuple[int, int]] = None,
    dropout_p: float = 0.0,
    dropout_keep: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, ...]:
    """Gradients of :func:`attention_ref` for ``q, k, v, prefix_k, prefix_v``, each in its input's dtype, and,
    when ``attn_bias`` is given, a sixth: the gradient of ``attn_bias`` in its shape and dtype (a float
    ``attn_mask`` gets no gradient here: pass it as ``attn_bias`` to have one), then, when ``prefix_bias`` is given,
    the gradient of ``prefix_bias`` in its shape and dtype, and, when ``sinks`` is given, last the gradient of
    ``sinks`` in its dtype.

    With softcap the scores' gradient passes through the cap's derivative ``1 - tanh²(s / softcap)`` (the bias
    gradient does not: the bias is added after the cap). A sink's gradient is ``-sum_rows p_sink * Δ`` over the
    samples and queries of its head, with ``p_sink = exp(sink - lse)`` and ``Δ = rowsum(dO * O) - dlse`` the
    softmax backward's row term: the sink is a logit whose value vector is zero.

    Written out by hand (the reference backend runs inside a custom op, where autograd is off); the tests check
    it against autograd through :func:`attention_ref`. ``generator`` must be in the state it had in the forward.
    """
    keys, values, probs, lse, scale, capped = _attention_probs(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_mask, attn_bias, causal,
        scale, compute_dtype, softcap, sinks, prefix_bias, window_size)
    dtype = probs.dtype
    grad_out = grad_out.to(dtype)
    keep = _dropout_keep(probs, dropout_p, dropout_keep, generator)
    grad_values = torch.matmul(_dropped(probs, keep, dropout_p).transpose(-1, -2), grad_out)
    grad_probs = _dropped(torch.matmul(grad_out, values.transpose(-1, -2)), keep, dropout_p)
    # softmax backward; lse's gradient adds to every probability of its row.
    row_term = (grad_probs * probs).sum(-1, keepdim=True)
    if grad_lse is not None:
        row_term = row_term - grad_lse.to(dtype).masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1)
    grad_logits = probs * (grad_probs - row_term)  # of cap(scale * q.k) + bias
    grad_scores = grad_logits * scale if capped is None else grad_logits * (1.0 - capped * capped) * scale
    grad_q = torch.matmul(grad_scores, keys)
    grad_keys = torch.matmul(grad_scores.transpose(-1, -2), q.to(dtype))

    # Undo the materialization: sum the query heads of each key/value head, split [prefix ; sequence], and sum
    # each bank entry's gradient over the samples that used it.
    batch, kv_heads = k.shape[0], k.shape[1]
    prefix_len = prefix_k.shape[-2]
    index = _index_or_zeros(prefix_index, batch, q.device)
    grads = []
    for grad_full, seq, bank in ((grad_keys, k, prefix_k), (grad_values, v, prefix_v)):
        grad_full = grad_full.unflatten(1, (kv_heads, -1)).sum(2)
        # the bank of keys or of values: their head dims may differ (multi-head latent attention)
        grad_bank = torch.zeros(bank.shape if bank.dim() == 4 else (1, *bank.shape), dtype=dtype, device=q.device)
        grad_bank.index_add_(0, index, grad_full[:, :, :prefix_len])
        grads.append((grad_full[:, :, prefix_len:].to(seq.dtype), grad_bank.view(bank.shape).to(bank.dtype)))
    (grad_k, grad_prefix_k), (grad_v, grad_prefix_v) = grads
    grads = (grad_q.to(q.dtype), grad_k, grad_v, grad_prefix_k, grad_prefix_v)
    if sinks is not None:
        grad_sinks = -(_sink_probs(sinks, lse) * row_term.squeeze(-1)).sum((0, 2)).to(sinks.dtype)
    if attn_bias is not None:
        grads = (*grads, _reduced_to(grad_logits[..., prefix_len:], attn_bias))
    if prefix_bias is not None:
        grads = (*grads, _reduced_to(grad_logits[..., :prefix_len], prefix_bias))
    return grads if sinks is None else (*grads, grad_sinks)


def _reduced_to(grad: Tensor, term: Tensor) -> Tensor:
    """The gradient of an additive term broadcast to ``grad``'s shape: summed over the leading dims it lacks and
    its size-1 dims, in its dtype."""
    if grad.dim() > term.dim():
        grad = grad.sum(tuple(range(grad.dim() - term.dim())))
    broadcast = [dim for dim in range(term.dim()) if term.shape[dim] == 1 and grad.shape[dim] != 1]
    if broadcast:
        grad = grad.sum(broadcast, keepdim=True)
    return grad.to(term.dtype)


def _attention_probs(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_mask,
                     attn_bias, causal, scale, compute_dtype, softcap=None, sinks=None, prefix_bias=None,
                     window_size=None):
    """The materialized keys [B, Hq, P + Nk, Dk] and values [B, Hq, P + Nk, Dv], the softmax probabilities and lse, the scale, and with
    ``softcap`` the capped scores' tanh (None without)."""
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, q_heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    prefix_index = _index_or_zeros(prefix_index, batch, q.device)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    # Materialize what the kernels never do: per-sample prefixes, [prefix ; sequence], one copy per query head.
    group = q_heads // kv_heads
    keys = torch.cat([prefix_k[prefix_index].to(compute_dtype), k.to(compute_dtype)], dim=2)
    values = torch.cat([prefix_v[prefix_index].to(compute_dtype), v.to(compute_dtype)], dim=2)
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)

    scores = torch.matmul(q.to(compute_dtype), keys.transpose(-1, -2)) * scale
    capped = None
    if softcap is not None:  # on every key's scaled score, before the additive terms and masks (Gemma2)
        capped = torch.tanh(scores / softcap)
        scores = capped * softcap
    additive = [t for t in (attn_bias, attn_mask) if t is not None and t.is_floating_point()]
    for term in additive:  # on the sequence keys only: the prefix columns get a zero bias
        bias = term.to(compute_dtype).expand(batch, q_heads, q.shape[2], k.shape[2])
        scores = scores + torch.cat([bias.new_zeros(*bias.shape[:3], prefix_k.shape[2]), bias], dim=-1)
    if prefix_bias is not None:  # the prefix columns' own additive term
        bias = prefix_bias.to(compute_dtype).expand(batch, q_heads, q.shape[2], prefix_k.shape[2])
        scores = scores + torch.cat([bias, bias.new_zeros(*bias.shape[:3], k.shape[2])], dim=-1)
    bool_mask = attn_mask if attn_mask is not None and attn_mask.dtype == torch.bool else None
    visible = _visibility(q, k, prefix_k.shape[2], prefix_index, prefix_lengths, key_padding_mask, bool_mask,
                          causal, window_size)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is None:
        lse = torch.logsumexp(scores, dim=-1)
    else:  # one more logit per head in each row's denominator, with no value
        sink_column = sinks.to(compute_dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
        lse = torch.logsumexp(torch.cat([scores, sink_column], dim=-1), dim=-1)
    # A query that sees nothing has lse = -inf; shifting by 0 instead keeps its probabilities at exp(-inf) = 0.
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1))
    return keys, values, probs, lse, scale, capped


def _sink_probs(sinks: Tensor, lse: Tensor) -> Tensor:
    """``[B, Hq, Nq]``: the probability of each row's sink, exp(sink - lse) (0 where lse = -inf: sink = -inf)."""
    sinks = sinks.to(lse.dtype)[None, :, None]
    return torch.exp(sinks - lse).masked_fill(lse == float("-inf"), 0.0)


def _dropout_keep(probs, dropout_p, dropout_keep, generator):
    """The bool mask of kept probabilities: the one given, one drawn from ``generator``, or None without dropout."""
    if dropout_keep is None and dropout_p > 0.0:
        dropout_keep = torch.rand(probs.shape, generator=generator, device=probs.device) >= dropout_p
    return dropout_keep


def _dropped(x, keep, dropout_p):
    """Dropout with a given mask; being linear in ``x``, it is its own backward."""
    return x if keep is None else x * keep / (1.0 - dropout_p)


def _index_or_zeros(prefix_index, batch, device):
    if prefix_index is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return prefix_index.long()


def _visibility(q, k, prefix_len, prefix_index, prefix_lengths, key_padding_mask, attn_mask, causal,
                window_size=None) -> Tensor:
    """Bool ``[B, Hq|1, Nq, P + Nk]``: which of the concatenated keys each query may attend to."""
    batch, _, q_len, _ = q.shape
    k_len = k.shape[2]
    device = q.device

    slot = torch.arange(prefix_len, device=device)
    if prefix_lengths is None:
        prefix_visible = torch.ones(batch, prefix_len, dtype=torch.bool, device=device)
    else:
        prefix_visible = slot[None, :] < prefix_lengths.long()[prefix_index][:, None]
    prefix_visible = prefix_visible[:, None, None, :].expand(batch, 1, q_len, prefix_len)

    seq_visible = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        seq_visible = seq_visible & key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        seq_visible = seq_visible & attn_mask  # broadcast from the right, as in scaled_dot_product_attention
    if causal or window_size is not None:
        # query i sits at key position i + Nk - Nq (bottom-right alignment)
        position = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        cols = torch.arange(k_len, device=device)[None, :]
        if causal:
            seq_visible = seq_visible & (cols <= position)
        if window_size is not None:
            left, right = window_size
            if left >= 0:
                seq_visible = seq_visible & (cols >= position - left)
            if right >= 0:
                seq_visible = seq_visible & (cols <= position + right)

    heads = seq_visible.shape[1]
    return torch.cat([prefix_visible.expand(batch, heads, q_len, prefix_len), seq_visible], dim=-1)
