"""Prefix attention in Triton: the kernels, their launchers, and the backend's ``forward`` / ``backward``.

Every kernel reads q, k, v and the prefix bank in place through strides: a shared prefix is read with batch stride
0, a bank entry through ``prefix_index``; GQA maps query head h to key/value head ``h // group``. Nothing is
concatenated, expanded or made contiguous.

* Forward — one program per (query block, query head, sample): one pass over the sample's prefix keys, then over
  its sequence keys, with an online softmax in the exp2 domain. Masks cost only where they can bite: the prefix
  is never masked but for its last partial block, interior sequence blocks carry no bounds or causal work. With
  few queries (decode) and GQA, a program takes all query heads of one key/value head instead, so that each
  key/value tile is read once per group rather than once per query head; and when such a forward has too few
  programs to fill the GPU (small batch, long cache), the keys are split across programs whose partial outputs a
  last kernel merges by their lse (split-KV, as in Flash-Decoding).
* Backward, FlashAttention-2 style — a pre-pass computes Δ = rowsum(dO·O) − dlse; one kernel computes dK/dV per
  key block (summing the query heads of a GQA group in the program), another dQ per query block. A prefix key
  block's dK/dV is one sample's share: it is summed over the samples that use the bank entry with fp32 atomics,
  or, in deterministic mode, stored per sample and summed in a fixed order. A last small kernel writes the prefix
  gradients in the prefix's own dtype.
* Dropout — a Philox counter per (sample·head stream, query, key column of [prefix slots ; sequence]) from one
  seed, so backward regenerates exactly the forward's mask; :func:`dropout_keep_mask` exposes that mask.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting

# Globals a kernel reads must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _load(ptrs, index_ok, dim_ok, CHECK_INDEX: tl.constexpr, CHECK_DIM: tl.constexpr):
    """A tile load that pays for bounds masks only where the caller says they can fail."""
    if CHECK_INDEX and CHECK_DIM:
        tile = tl.load(ptrs, mask=index_ok & dim_ok, other=0.0)
    elif CHECK_INDEX:
        tile = tl.load(ptrs, mask=index_ok, other=0.0)
    elif CHECK_DIM:
        tile = tl.load(ptrs, mask=dim_ok, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _operand_base(Ptr, b, h, stride_b, stride_h, PRESENT: tl.constexpr):
    """Where an optional per-(sample, head) operand (mask, bias, bias gradient) starts for sample b and head h
    (``h`` may be a column of per-row heads); the argument as passed (None) when the operand is absent."""
    base = Ptr
    if PRESENT:
        base = Ptr + b * stride_b + h * stride_h
    return base


@triton.jit
def _bank_entry(PrefixIndex, PrefixLengths, b, num_prefixes, prefix_len,
                HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Sample b's bank entry, how many of its keys it sees, and whether its index was in range.

    The host checks the index; this guards the device anyway: an entry out of range reads no prefix (the forward
    then writes NaN rows), and a length is clamped to [0, P]."""
    entry = b * 0
    if HAS_INDEX:
        entry = tl.load(PrefixIndex + b).to(tl.int64)
    in_range = (entry >= 0) & (entry < num_prefixes)
    entry = tl.where(in_range, entry, 0)
    keys = prefix_len + b.to(tl.int32) * 0
    if HAS_LENGTHS:
        keys = tl.minimum(tl.maximum(tl.load(PrefixLengths + entry).to(tl.int32), 0), prefix_len)
    keys = tl.where(in_range, keys, 0)
    return entry, keys, in_range


@triton.jit
def _visible(rows, cols, q_len, k_len, diag, key_pad, stride_kpn, dense, stride_mm, stride_mn,
             CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr):
    """Which (query, key) pairs may attend. ``rows`` and ``cols`` broadcast to a 2-D block in either orientation,
    so the forward's [queries, keys] tiles and the dK/dV kernel's [keys, queries] tiles share this one rule."""
    visible = cols < k_len
    if CAUSAL:
        visible = visible & (cols <= rows + diag)
    if HAS_KEY_PAD:
        visible = visible & (tl.load(key_pad + cols * stride_kpn, mask=cols < k_len, other=0) != 0)
    if HAS_DENSE:
        in_bounds = (rows < q_len) & (cols < k_len)
        visible = visible & (tl.load(dense + rows * stride_mm + cols * stride_mn, mask=in_bounds, other=0) != 0)
    return visible


@triton.jit
def _biased(scores, bias, rows, cols, q_len, k_len, stride_bm, stride_bn):
    """Scores (log2 units) plus the additive bias of their (query, key) pairs; ``rows`` and ``cols`` broadcast in
    either orientation, as in ``_visible``."""
    in_bounds = (rows < q_len) & (cols < k_len)
    values = tl.load(bias + rows * stride_bm + cols * stride_bn, mask=in_bounds, other=0.0)
    return scores + values.to(tl.float32) * LOG2E


@triton.jit
def _dropout_keep(seed, stream, rows, cols, cols_total, dropout_p):
    """Keep mask of dropout: Philox on (query · (P + Nk) + key column, sample·head stream) under ``seed``."""
    counter = rows * cols_total + cols
    zero = tl.zeros_like(counter)
    bits, _, _, _ = tl.philox(seed, counter, zero + stream, zero, zero)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _sequence_key_range(first_query, end_query, diag, k_len, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For queries [first_query, end_query): the end of the sequence key blocks all of them see whole (no bounds or
    causal mask needed), and the end of the keys any of them sees (causal: key j <= query + diag)."""
    if CAUSAL:
        seq_full = tl.maximum(tl.minimum(first_query + diag + 1, k_len), 0) // BLOCK_N * BLOCK_N
        seq_end = tl.minimum(tl.maximum(end_query + diag, 0), k_len)
    else:
        seq_full = first_query * 0 + k_len // BLOCK_N * BLOCK_N
        seq_end = first_query * 0 + k_len
    return seq_full, seq_end


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _attend(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
            start, end, k_len, offs_m, offs_d, q_len, diag,
            key_pad, stride_kpn, dense, stride_mm, stride_mn,
            seed, stream, col_base, cols_total, dropout_p, qk_scale, bias, stride_bm, stride_bn,
            HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_BOUNDS: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
            DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with key blocks [start, end) of one key/value source."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # 1. scores of the block, in log2 units; keys of another dtype (a float32 prefix) are converted on load
        k_t = _load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, offs_n[None, :] < k_len,
                    offs_d[:, None] < HEAD_DIM, MASK_BOUNDS, PAD_D).to(q.dtype)
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            scores = _biased(scores, bias, offs_m[:, None], offs_n[None, :], q_len, k_len, stride_bm, stride_bn)
        if MASK_BOUNDS or CAUSAL or HAS_KEY_PAD or HAS_DENSE:
            visible = _visible(offs_m[:, None], offs_n[None, :], q_len, k_len, diag, key_pad, stride_kpn, dense,
                               stride_mm, stride_mn, CAUSAL, HAS_KEY_PAD, HAS_DENSE)
            scores = tl.where(visible, scores, float("-inf"))
        # 2. new running max; a row that has seen nothing yet keeps -inf and is shifted by 0 instead
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        probs = tl.math.exp2(scores - shift[:, None])
        alpha = tl.math.exp2(m_i - shift)
        # 3. the normalizer sums the probabilities before dropout; the output accumulates the kept ones
        l_i = l_i * alpha + tl.sum(probs, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, stream, offs_m[:, None], col_base + offs_n[None, :], cols_total, dropout_p)
            probs = tl.where(keep, probs, 0.0)
        v = _load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n[:, None] < k_len,
                  offs_d[None, :] < HEAD_DIM, MASK_BOUNDS, PAD_D).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(probs.to(q.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend_staged(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                   lo, hi, full_end, k_len, offs_m, offs_d, q_len, diag,
                   key_pad, stride_kpn, dense, stride_mm, stride_mn,
                   seed, stream, col_base, cols_total, dropout_p, qk_scale, bias, stride_bm, stride_bn,
                   HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Key blocks [lo, hi) of one source in two stages: those before ``full_end``, which every query of the block
    sees whole, without bounds or causal masks; the rest (the ragged end, the causal diagonal) with them."""
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                            lo, tl.minimum(hi, full_end), k_len, offs_m, offs_d, q_len, diag,
                            key_pad, stride_kpn, dense, stride_mm, stride_mn,
                            seed, stream, col_base, cols_total, dropout_p, qk_scale, bias, stride_bm, stride_bn,
                            HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, BLOCK_N=BLOCK_N, MASK_BOUNDS=False, CAUSAL=False,
                            HAS_KEY_PAD=HAS_KEY_PAD, HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT,
                            DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                            tl.maximum(lo, full_end), hi, k_len, offs_m, offs_d, q_len, diag,
                            key_pad, stride_kpn, dense, stride_mm, stride_mn,
                            seed, stream, col_base, cols_total, dropout_p, qk_scale, bias, stride_bm, stride_bn,
                            HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, BLOCK_N=BLOCK_N, MASK_BOUNDS=True, CAUSAL=CAUSAL,
                            HAS_KEY_PAD=HAS_KEY_PAD, HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT,
                            DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS)
    return acc, l_i, m_i


@triton.jit
def _forward_kernel(
    Q, K, V, PK, PV, Out, Lse, PrefixIndex, PrefixLengths, KeyPad, Dense, Bias, Seed,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd, stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_os, stride_ob, stride_oh, stride_om, stride_ls, stride_kpb, stride_kpn, stride_mb, stride_mh, stride_mm,
    stride_mn, stride_bb, stride_bh, stride_bm, stride_bn,
    q_heads, q_len, k_len, num_prefixes, prefix_len, group, qk_scale, dropout_p, num_splits,
    q_len_class, k_len_class,  # autotuning keys only
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAD_D: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, PACK_GQA: tl.constexpr,
    SPLIT_KV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of query rows of one sample. A row is a query of the program's query head, or, with PACK_GQA
    (few queries, several query heads per key/value head), a (query, head) pair of the program's key/value head:
    row r is query r // group of query head hkv·group + r % group. Packing fills the block with the group's heads
    so that each key/value tile is loaded once for all of them instead of once per head.

    With SPLIT_KV (too few programs to fill the GPU), program (block, split) attends to the split-th of
    ``num_splits`` equal runs of key blocks of [prefix blocks ; sequence blocks] and writes its own normalized
    output and lse at offsets ``split · stride_os`` / ``split · stride_ls``; ``_combine_splits_kernel`` merges
    them. An additive bias (HAS_BIAS) applies to the sequence keys' scores only."""
    pid_m = tl.program_id(0)
    split = 0
    if SPLIT_KV:
        split = pid_m % num_splits
        pid_m = pid_m // num_splits
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACK_GQA:
        hkv = tl.program_id(1)
        h = hkv * group + rows % group  # per row; used below as a [BLOCK_M, 1] column
        head_col = h[:, None]
        offs_m = rows // group
        first_query, end_query = pid_m * BLOCK_M // group, (pid_m * BLOCK_M + BLOCK_M - 1) // group + 1
    else:
        h = tl.program_id(1)
        hkv = h // group
        head_col = h
        offs_m = rows
        first_query, end_query = pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M
    entry, prefix_keys, index_ok = _bank_entry(PrefixIndex, PrefixLengths, b, num_prefixes, prefix_len,
                                               HAS_INDEX, HAS_LENGTHS)
    offs_d = tl.arange(0, D_PAD)
    q = _load(Q + b * stride_qb + head_col * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
              offs_m[:, None] < q_len, offs_d[None, :] < HEAD_DIM, True, PAD_D)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    stream = (b * q_heads + head_col).to(tl.int32)
    cols_total = prefix_len + k_len
    key_pad = _operand_base(KeyPad, b, 0, stride_kpb, 0, HAS_KEY_PAD)
    dense = _operand_base(Dense, b, head_col, stride_mb, stride_mh, HAS_DENSE)
    bias = _operand_base(Bias, b, head_col, stride_bb, stride_bh, HAS_BIAS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # This program's key blocks: all of both sources, or one split's run of [prefix blocks ; sequence blocks].
    diag = k_len - q_len
    seq_full, seq_end = _sequence_key_range(first_query, end_query, diag, k_len, BLOCK_N, CAUSAL)
    prefix_lo, prefix_hi = 0, prefix_keys
    seq_lo, seq_hi = 0, seq_end
    if SPLIT_KV:
        prefix_span = tl.cdiv(prefix_len, BLOCK_N) * BLOCK_N
        per_split = tl.cdiv(prefix_span // BLOCK_N + tl.cdiv(k_len, BLOCK_N), num_splits) * BLOCK_N
        lo = split * per_split
        prefix_lo, prefix_hi = tl.minimum(lo, prefix_span), tl.minimum(lo + per_split, prefix_keys)
        seq_lo, seq_hi = tl.maximum(lo - prefix_span, 0), tl.minimum(lo + per_split - prefix_span, seq_end)

    # Stage 1: the prefix. Always visible (no mask, no bias, no causal rule): only its last partial block is
    # masked, and only for bounds.
    PKb = PK + entry * stride_pkt + hkv * stride_pkh
    PVb = PV + entry * stride_pvt + hkv * stride_pvh
    acc, l_i, m_i = _attend_staged(acc, l_i, m_i, q, PKb, PVb, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                                   prefix_lo, prefix_hi, prefix_keys // BLOCK_N * BLOCK_N, prefix_keys, offs_m,
                                   offs_d, q_len, 0, key_pad, stride_kpn, dense, stride_mm, stride_mn,
                                   seed, stream, 0, cols_total, dropout_p, qk_scale, bias, stride_bm, stride_bn,
                                   HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, BLOCK_N=BLOCK_N, CAUSAL=False, HAS_KEY_PAD=False,
                                   HAS_DENSE=False, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION,
                                   HAS_BIAS=False)

    # Stage 2: the sequence, with the caller's masks, bias and causal rule.
    Kb = K + b * stride_kb + hkv * stride_kh
    Vb = V + b * stride_vb + hkv * stride_vh
    acc, l_i, m_i = _attend_staged(acc, l_i, m_i, q, Kb, Vb, stride_kn, 1, stride_vn, 1,
                                   seq_lo, seq_hi, seq_full, k_len, offs_m, offs_d, q_len, diag,
                                   key_pad, stride_kpn, dense, stride_mm, stride_mn,
                                   seed, stream, prefix_len, cols_total, dropout_p, qk_scale, bias, stride_bm,
                                   stride_bn, HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL,
                                   HAS_KEY_PAD=HAS_KEY_PAD, HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT,
                                   DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS)

    # Epilogue: normalize; a query that saw no key gets 0 and lse = -inf. Dropout's 1/(1-p) is applied once here.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    out = tl.where(index_ok, out, float("nan"))
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    row_ok = offs_m < q_len
    tl.store(Out + split * stride_os + b * stride_ob + head_col * stride_oh + offs_m[:, None] * stride_om
             + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + split * stride_ls + (b * q_heads + h) * q_len + offs_m, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    PartialOut, PartialLse, Out, Lse, stride_ps, stride_pb, stride_ph, stride_pm, stride_ls,
    stride_ob, stride_oh, stride_om, q_heads, q_len, num_splits,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the splits of a split-KV forward: lse = log Σ exp(lse_s), out = Σ exp(lse_s − lse) · out_s.
    Splits that saw no key (lse_s = −inf) weigh 0; a row no split saw keeps out 0 and lse −inf."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < q_len
    lse_rows = PartialLse + (b * q_heads + h) * q_len + offs_m
    out_rows = PartialOut + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_pm + offs_d[None, :]
    out_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    top = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        top = tl.maximum(top, tl.load(lse_rows + s * stride_ls, mask=row_ok, other=float("-inf")))
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for s in range(0, num_splits):
        weight = tl.exp(tl.load(lse_rows + s * stride_ls, mask=row_ok, other=float("-inf")) - shift)
        total += weight
        acc += weight[:, None] * tl.load(out_rows + s * stride_ps, mask=out_ok, other=0.0)
    seen = total > 0.0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, shift + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=out_ok)
    tl.store(Lse + (b * q_heads + h) * q_len + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _backward_preprocess_kernel(
    Out, DOut, DLse, Delta, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dlb, stride_dlh, stride_dlm, q_heads, q_len,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Δ = rowsum(dO · O) − dlse: the softmax backward's row term (an lse gradient adds to every probability)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    out = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask,
                  other=0.0).to(tl.float32)
    d_out = tl.load(DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(out * d_out, 1)
    rows = (b * q_heads + h) * q_len + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + b * stride_dlb + h * stride_dlh + offs_m * stride_dlm, mask=offs_m < q_len,
                         other=0.0)
    tl.store(Delta + rows, delta, mask=offs_m < q_len)


@triton.jit
def _lse_log2(Lse, rows, row_ok):
    """lse in log2 units for recomputing probabilities; +inf where a row is out of range or saw nothing, so that
    its probabilities come out as exp2(-inf) = 0."""
    lse = tl.load(Lse + rows, mask=row_ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _accumulate_key_grads(dk, dv, k, v, Q, DOut, Lse, Delta, stride_qm, stride_dom, stride_dod, row_base,
                          start, end, offs_n, offs_d, q_len, diag,
                          key_pad, stride_kpn, dense, stride_mm, stride_mn, k_len,
                          seed, stream, col_base, cols_total, dropout_p, qk_scale, bias, stride_bm, stride_bn,
                          HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr,
                          HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr):
    """dK, dV of one key block from query blocks [start, end) of one query head; tiles are [keys, queries]."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        q = _load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], row_ok[:, None], offs_d[None, :] < HEAD_DIM,
                  True, PAD_D)
        d_out = _load(DOut + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, row_ok[:, None],
                      offs_d[None, :] < HEAD_DIM, True, PAD_D).to(q.dtype)
        lse = _lse_log2(Lse, row_base + offs_m, row_ok)
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            scores_t = _biased(scores_t, bias, offs_m[None, :], offs_n[:, None], q_len, k_len, stride_bm, stride_bn)
        probs_t = tl.math.exp2(scores_t - lse[None, :])
        if CAUSAL or HAS_KEY_PAD or HAS_DENSE:
            visible = _visible(offs_m[None, :], offs_n[:, None], q_len, k_len, diag, key_pad, stride_kpn, dense,
                               stride_mm, stride_mn, CAUSAL, HAS_KEY_PAD, HAS_DENSE)
            probs_t = tl.where(visible, probs_t, 0.0)
        d_probs_t = tl.dot(v, tl.trans(d_out), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, stream, offs_m[None, :], col_base + offs_n[:, None], cols_total, dropout_p)
            scale_kept = 1.0 / (1.0 - dropout_p)
            dv += tl.dot(tl.where(keep, probs_t * scale_kept, 0.0).to(q.dtype), d_out,
                         input_precision=DOT_PRECISION)
            d_probs_t = tl.where(keep, d_probs_t * scale_kept, 0.0)
        else:
            dv += tl.dot(probs_t.to(q.dtype), d_out, input_precision=DOT_PRECISION)
        delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
        d_scores_t = probs_t * (d_probs_t - delta[None, :])
        dk += tl.dot(d_scores_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _backward_key_kernel(
    Q, K, V, PK, PV, DOut, Lse, Delta, DK, DV, PrefixGradK, PrefixGradV,
    PrefixIndex, PrefixLengths, KeyPad, Dense, Bias, Seed,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd, stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod, stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn, stride_kpb, stride_kpn, stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    q_heads, q_len, k_len, num_prefixes, prefix_len, group, qk_scale, sm_scale, dropout_p,
    q_len_class, k_len_class,  # autotuning keys only
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAD_D: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK/dV of one key block (prefix blocks first, then sequence blocks) of one key/value head of one sample."""
    pid_n = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    prefix_blocks = tl.cdiv(prefix_len, BLOCK_N)
    is_prefix = pid_n < prefix_blocks
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d[None, :] < HEAD_DIM
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    cols_total = prefix_len + k_len
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)

    if is_prefix:
        entry, prefix_keys, index_ok = _bank_entry(PrefixIndex, PrefixLengths, b, num_prefixes, prefix_len,
                                                   HAS_INDEX, HAS_LENGTHS)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = offs_n[:, None] < prefix_keys
        if pid_n * BLOCK_N < prefix_keys:
            k = _load(PK + entry * stride_pkt + hkv * stride_pkh + offs_n[:, None] * stride_pkn
                      + offs_d[None, :] * stride_pkd, key_ok, d_ok, True, PAD_D).to(Q.dtype.element_ty)
            v = _load(PV + entry * stride_pvt + hkv * stride_pvh + offs_n[:, None] * stride_pvn
                      + offs_d[None, :] * stride_pvd, key_ok, d_ok, True, PAD_D).to(Q.dtype.element_ty)
            for g in range(0, group):
                h = hkv * group + g
                dk, dv = _accumulate_key_grads(
                    dk, dv, k, v, Q + b * stride_qb + h * stride_qh, DOut + b * stride_dob + h * stride_doh, Lse,
                    Delta, stride_qm, stride_dom, stride_dod, (b * q_heads + h) * q_len, 0, q_len, offs_n, offs_d,
                    q_len, 0, KeyPad, stride_kpn, Dense, stride_mm, stride_mn, prefix_keys, seed,
                    (b * q_heads + h).to(tl.int32), 0, cols_total, dropout_p, qk_scale, Bias, stride_bm, stride_bn,
                    HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, BLOCK_M=BLOCK_M, CAUSAL=False, HAS_KEY_PAD=False,
                    HAS_DENSE=False, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION, HAS_BIAS=False)
            # One sample's share of the bank entry's gradient: [S, Hkv, P, D] float32 buffers indexed by the
            # entry (atomics) or by the sample (deterministic, summed in order by the finalize kernel).
            slot = entry
            if DETERMINISTIC:
                slot = b
            offsets = ((slot * tl.num_programs(1) + hkv) * prefix_len + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
            grad_ok = key_ok & d_ok
            if DETERMINISTIC:
                tl.store(PrefixGradK + offsets, dk * sm_scale, mask=grad_ok)
                tl.store(PrefixGradV + offsets, dv, mask=grad_ok)
            else:
                tl.atomic_add(PrefixGradK + offsets, dk * sm_scale, mask=grad_ok, sem="relaxed")
                tl.atomic_add(PrefixGradV + offsets, dv, mask=grad_ok, sem="relaxed")
    else:
        start_n = (pid_n - prefix_blocks) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n[:, None] < k_len
        k = _load(K + b * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], key_ok, d_ok,
                  True, PAD_D)
        v = _load(V + b * stride_vb + hkv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], key_ok, d_ok,
                  True, PAD_D)
        key_pad = _operand_base(KeyPad, b, 0, stride_kpb, 0, HAS_KEY_PAD)
        diag = k_len - q_len
        # Causal: queries before first_row see none of these keys; from full_row on, they see all of them.
        if CAUSAL:
            first_row = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
            full_row = tl.maximum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M,
                                  first_row)
        else:
            first_row = 0
            full_row = 0
        for g in range(0, group):
            h = hkv * group + g
            dense = _operand_base(Dense, b, h, stride_mb, stride_mh, HAS_DENSE)
            bias = _operand_base(Bias, b, h, stride_bb, stride_bh, HAS_BIAS)
            q_head = Q + b * stride_qb + h * stride_qh
            do_head = DOut + b * stride_dob + h * stride_doh
            row_base = (b * q_heads + h) * q_len
            stream = (b * q_heads + h).to(tl.int32)
            # two stages: the query blocks on the causal diagonal with the causal rule, those after it without
            dk, dv = _accumulate_key_grads(
                dk, dv, k, v, q_head, do_head, Lse, Delta, stride_qm, stride_dom, stride_dod, row_base,
                first_row, tl.minimum(full_row, q_len), offs_n, offs_d, q_len, diag, key_pad, stride_kpn, dense,
                stride_mm, stride_mn, k_len, seed, stream, prefix_len, cols_total, dropout_p, qk_scale,
                bias, stride_bm, stride_bn, HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, BLOCK_M=BLOCK_M, CAUSAL=CAUSAL,
                HAS_KEY_PAD=HAS_KEY_PAD, HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION,
                HAS_BIAS=HAS_BIAS)
            dk, dv = _accumulate_key_grads(
                dk, dv, k, v, q_head, do_head, Lse, Delta, stride_qm, stride_dom, stride_dod, row_base,
                full_row, q_len, offs_n, offs_d, q_len, diag, key_pad, stride_kpn, dense,
                stride_mm, stride_mn, k_len, seed, stream, prefix_len, cols_total, dropout_p, qk_scale,
                bias, stride_bm, stride_bn, HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, BLOCK_M=BLOCK_M, CAUSAL=False,
                HAS_KEY_PAD=HAS_KEY_PAD, HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION,
                HAS_BIAS=HAS_BIAS)
        grad_ok = key_ok & d_ok
        tl.store(DK + b * stride_dkb + hkv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=grad_ok)
        tl.store(DV + b * stride_dvb + hkv * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=grad_ok)


@triton.jit
def _accumulate_query_grad(dq, q, d_out, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                           start, end, k_len, offs_m, offs_d, q_len, diag,
                           key_pad, stride_kpn, dense, stride_mm, stride_mn,
                           seed, stream, col_base, cols_total, dropout_p, qk_scale,
                           bias, stride_bm, stride_bn, dbias, stride_dbm, stride_dbn,
                           HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
                           MASK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr,
                           HAS_DENSE: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr):
    """dQ of one query block from key blocks [start, end) of one key/value source; with BIAS_GRAD, also the
    gradient of the additive bias (the scores' gradient, in natural units) of these (query, key) pairs."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n[:, None] < k_len,
                  offs_d[None, :] < HEAD_DIM, MASK_BOUNDS, PAD_D).to(q.dtype)
        v = _load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n[:, None] < k_len,
                  offs_d[None, :] < HEAD_DIM, MASK_BOUNDS, PAD_D).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            scores = _biased(scores, bias, offs_m[:, None], offs_n[None, :], q_len, k_len, stride_bm, stride_bn)
        probs = tl.math.exp2(scores - lse[:, None])
        if MASK_BOUNDS or CAUSAL or HAS_KEY_PAD or HAS_DENSE:
            visible = _visible(offs_m[:, None], offs_n[None, :], q_len, k_len, diag, key_pad, stride_kpn, dense,
                               stride_mm, stride_mn, CAUSAL, HAS_KEY_PAD, HAS_DENSE)
            probs = tl.where(visible, probs, 0.0)
        d_probs = tl.dot(d_out, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, stream, offs_m[:, None], col_base + offs_n[None, :], cols_total, dropout_p)
            d_probs = tl.where(keep, d_probs * (1.0 / (1.0 - dropout_p)), 0.0)
        d_scores = probs * (d_probs - delta[:, None])
        if BIAS_GRAD:
            tl.store(dbias + offs_m[:, None] * stride_dbm + offs_n[None, :] * stride_dbn, d_scores,
                     mask=(offs_m[:, None] < q_len) & (offs_n[None, :] < k_len))
        dq += tl.dot(d_scores.to(q.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _query_grad_staged(dq, q, d_out, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                       lo, hi, full_end, k_len, offs_m, offs_d, q_len, diag,
                       key_pad, stride_kpn, dense, stride_mm, stride_mn,
                       seed, stream, col_base, cols_total, dropout_p, qk_scale,
                       bias, stride_bm, stride_bn, dbias, stride_dbm, stride_dbn,
                       HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr):
    """dQ over key blocks [lo, hi) of one source in the forward's two stages: before ``full_end`` without bounds
    or causal masks, the rest with them."""
    dq = _accumulate_query_grad(dq, q, d_out, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                lo, tl.minimum(hi, full_end), k_len, offs_m, offs_d, q_len, diag,
                                key_pad, stride_kpn, dense, stride_mm, stride_mn,
                                seed, stream, col_base, cols_total, dropout_p, qk_scale,
                                bias, stride_bm, stride_bn, dbias, stride_dbm, stride_dbn,
                                HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, BLOCK_N=BLOCK_N, MASK_BOUNDS=False, CAUSAL=False,
                                HAS_KEY_PAD=HAS_KEY_PAD, HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT,
                                DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS, BIAS_GRAD=BIAS_GRAD)
    dq = _accumulate_query_grad(dq, q, d_out, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                tl.maximum(lo, full_end), hi, k_len, offs_m, offs_d, q_len, diag,
                                key_pad, stride_kpn, dense, stride_mm, stride_mn,
                                seed, stream, col_base, cols_total, dropout_p, qk_scale,
                                bias, stride_bm, stride_bn, dbias, stride_dbm, stride_dbn,
                                HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, BLOCK_N=BLOCK_N, MASK_BOUNDS=True, CAUSAL=CAUSAL,
                                HAS_KEY_PAD=HAS_KEY_PAD, HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT,
                                DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS, BIAS_GRAD=BIAS_GRAD)
    return dq


@triton.jit
def _backward_query_kernel(
    Q, K, V, PK, PV, DOut, Lse, Delta, DQ, PrefixIndex, PrefixLengths, KeyPad, Dense, Bias, DBias, Seed,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd, stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm,
    stride_kpb, stride_kpn, stride_mb, stride_mh, stride_mm, stride_mn, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn,
    q_heads, q_len, k_len, num_prefixes, prefix_len, group, qk_scale, sm_scale, dropout_p,
    q_len_class, k_len_class,  # autotuning keys only
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAD_D: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block of one head of one sample: the forward's two stages, replayed. With BIAS_GRAD it
    also writes the bias gradient of the sequence keys it visits (the caller zeroes the rest)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hkv = h // group
    entry, prefix_keys, index_ok = _bank_entry(PrefixIndex, PrefixLengths, b, num_prefixes, prefix_len,
                                               HAS_INDEX, HAS_LENGTHS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < q_len
    q = _load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], row_ok[:, None],
              offs_d[None, :] < HEAD_DIM, True, PAD_D)
    d_out = _load(DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                  + offs_d[None, :] * stride_dod, row_ok[:, None], offs_d[None, :] < HEAD_DIM, True,
                  PAD_D).to(q.dtype)
    rows = (b * q_heads + h) * q_len + offs_m
    lse = _lse_log2(Lse, rows, row_ok)
    delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    stream = (b * q_heads + h).to(tl.int32)
    cols_total = prefix_len + k_len
    key_pad = _operand_base(KeyPad, b, 0, stride_kpb, 0, HAS_KEY_PAD)
    dense = _operand_base(Dense, b, h, stride_mb, stride_mh, HAS_DENSE)
    bias = _operand_base(Bias, b, h, stride_bb, stride_bh, HAS_BIAS)
    dbias = _operand_base(DBias, b, h, stride_dbb, stride_dbh, BIAS_GRAD)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    PKb = PK + entry * stride_pkt + hkv * stride_pkh
    PVb = PV + entry * stride_pvt + hkv * stride_pvh
    dq = _query_grad_staged(dq, q, d_out, lse, delta, PKb, PVb, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                            0, prefix_keys, prefix_keys // BLOCK_N * BLOCK_N, prefix_keys, offs_m, offs_d, q_len, 0,
                            key_pad, stride_kpn, dense, stride_mm, stride_mn, seed, stream, 0, cols_total,
                            dropout_p, qk_scale, bias, stride_bm, stride_bn, dbias, stride_dbm, stride_dbn,
                            HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, BLOCK_N=BLOCK_N, CAUSAL=False, HAS_KEY_PAD=False,
                            HAS_DENSE=False, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION, HAS_BIAS=False,
                            BIAS_GRAD=False)
    Kb = K + b * stride_kb + hkv * stride_kh
    Vb = V + b * stride_vb + hkv * stride_vh
    diag = k_len - q_len
    seq_full, seq_end = _sequence_key_range(pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M, diag, k_len, BLOCK_N,
                                            CAUSAL)
    dq = _query_grad_staged(dq, q, d_out, lse, delta, Kb, Vb, stride_kn, 1, stride_vn, 1,
                            0, seq_end, seq_full, k_len, offs_m, offs_d, q_len, diag, key_pad, stride_kpn, dense,
                            stride_mm, stride_mn, seed, stream, prefix_len, cols_total, dropout_p, qk_scale,
                            bias, stride_bm, stride_bn, dbias, stride_dbm, stride_dbn,
                            HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL, HAS_KEY_PAD=HAS_KEY_PAD,
                            HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION,
                            HAS_BIAS=HAS_BIAS, BIAS_GRAD=BIAS_GRAD)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _prefix_grad_finalize_kernel(
    PartialK, PartialV, GradK, GradV, PrefixIndex,
    stride_gkt, stride_gkh, stride_gkn, stride_gkd, stride_gvt, stride_gvh, stride_gvn, stride_gvd,
    batch, kv_heads, prefix_len,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_INDEX: tl.constexpr, SUM_SAMPLES: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The prefix gradients in their own dtype: the float32 per-entry sums, or (deterministic) the per-sample
    partials summed over the samples that used the entry, in sample order."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    hkv = tl.program_id(1)
    t = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_n[:, None] < prefix_len) & (offs_d[None, :] < HEAD_DIM)
    tile = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    if SUM_SAMPLES:
        grad_k = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        grad_v = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        for s in range(0, batch):
            # A scalar branch, not a mask: Triton 3.9's interpreter turns `block mask & scalar comparison` into
            # an int32 mask, which tl.load then rejects ('mask has unsupported dtype').
            entry = t
            if HAS_INDEX:
                entry = tl.load(PrefixIndex + s).to(tl.int64)
            if entry == t:
                base = (s * kv_heads + hkv) * prefix_len * HEAD_DIM
                grad_k += tl.load(PartialK + base + tile, mask=mask, other=0.0)
                grad_v += tl.load(PartialV + base + tile, mask=mask, other=0.0)
    else:
        base = (t * kv_heads + hkv) * prefix_len * HEAD_DIM
        grad_k = tl.load(PartialK + base + tile, mask=mask, other=0.0)
        grad_v = tl.load(PartialV + base + tile, mask=mask, other=0.0)
    tl.store(GradK + t * stride_gkt + hkv * stride_gkh + offs_n[:, None] * stride_gkn + offs_d[None, :] * stride_gkd,
             grad_k.to(GradK.dtype.element_ty), mask=mask)
    tl.store(GradV + t * stride_gvt + hkv * stride_gvh + offs_n[:, None] * stride_gvn + offs_d[None, :] * stride_gvd,
             grad_v.to(GradV.dtype.element_ty), mask=mask)


def dropout_keep_mask(seed: torch.Tensor, batch: int, q_heads: int, q_len: int, prefix_len: int, k_len: int,
                      dropout_p: float) -> torch.Tensor:
    """The bool keep mask ``[B, Hq, Nq, P + Nk]`` the kernels draw from ``seed`` (a debugging and testing aid:
    pass it to :func:`ptv2_kernels.attention_ref` as ``dropout_keep`` to compare a dropout run exactly)."""
    cols = prefix_len + k_len
    keep = torch.empty(batch, q_heads, q_len, cols, dtype=torch.int8, device=seed.device)
    if keep.numel():
        grid = (q_heads * batch, triton.cdiv(q_len, 16))
        _dropout_mask_kernel[grid](keep, seed, q_len, cols, dropout_p, BLOCK_M=16,
                                   BLOCK_N=triton.next_power_of_2(cols))
    return keep.bool()


@triton.jit
def _dropout_mask_kernel(Keep, Seed, q_len, cols, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    stream = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(Seed), stream, rows[:, None], offs_c[None, :], cols, dropout_p)
    tl.store(Keep + (stream.to(tl.int64) * q_len + rows[:, None]) * cols + offs_c[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < q_len) & (offs_c[None, :] < cols))


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------

def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# (BLOCK_M, BLOCK_N, warps, stages). Large query blocks with 3-stage pipelines suit Ampere and Hopper alike at long
# sequences; the small-BLOCK_M ones serve decode and short queries. prune_configs keeps, per call, those that fit
# the GPU's registers and shared memory at the call's head dim. The 8-warp backward tiles 32x64 (keys) and 64x64
# (queries) exist for head dim 128, where the 4-warp ones spill (benchmarks/static_report.py; 64x64 keys with 8
# warps spill there too).
_FORWARD_CONFIGS = _configs([
    (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4),
    (32, 64, 4, 3), (16, 64, 4, 3), (16, 128, 4, 2),
])
_KEY_GRAD_CONFIGS = _configs([
    (64, 128, 8, 3), (32, 128, 8, 2), (32, 64, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3),
    (16, 64, 4, 2), (16, 32, 4, 2),
])
_QUERY_GRAD_CONFIGS = _configs([
    (128, 64, 8, 3), (64, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 2),
    (16, 64, 4, 2),
])
# The interpreter cannot time configurations and runs each program in Python: one small block shape.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}
_AUTOTUNE_KEY = ["q_len_class", "k_len_class", "HEAD_DIM", "CAUSAL", "HAS_KEY_PAD", "HAS_DENSE", "HAS_BIAS",
                 "HAS_DROPOUT"]
# The forward packs the query heads of a GQA group into one program's rows up to this many queries: decode (1) and
# speculative or chunked decode steps. Longer queries fill whole blocks per head, and their key/value tiles, shared
# by the group's programs running side by side, come from L2.
PACK_GQA_MAX_QUERIES = 16
# Split-KV forward (decode with too few programs for the GPU): the fewest keys a split takes, and the most splits.
MIN_KEYS_PER_SPLIT = 256
MAX_KV_SPLITS = 32
# Register budget (fp32 tile elements live per thread, see _live_per_thread) above which a configuration spills:
# fitted to the compiled kernels at the target shapes (benchmarks/static_report.py), per architecture major.
_REGISTER_BUDGET = {"forward": {9: 160, 8: 128}, "backward": {9: 192, 8: 128}}
_SHARED_SLACK = 2048  # bytes beyond the tiles: row statistics, reductions


def _kernel_kind(kernel_name: str) -> str:
    return {"_backward_key_kernel": "keys", "_backward_query_kernel": "queries"}.get(kernel_name, "forward")


def _live_per_thread(kind, block_m, block_n, d_pad, warps):
    """fp32 tile elements each thread holds at the kernel's peak: the accumulators, the score-sized tiles, and the
    16-bit operand tiles kept in registers (counted at half). Forward: acc [M, D], scores [M, N], q [M, D]. Key
    gradients: dK, dV [N, D], k and v [N, D], scores and dP [M, N]. Query gradients: dQ [M, D], q and dO [M, D],
    scores and dP [M, N]."""
    m, n, d = block_m, block_n, d_pad
    live = {"forward": m * d + m * n + m * d / 2, "keys": 2 * n * d + n * d + 2 * m * n,
            "queries": m * d + m * d + 2 * m * n}[kind]
    return live / (32 * warps)


def shared_memory_estimate(kind, block_m, block_n, d_pad, stages, element_size):
    """Upper bound of a configuration's shared memory in bytes: ``stages`` buffers of the pipelined operand tiles
    (Triton's pipeliner allocates that many on Hopper, one fewer on Ampere) and the resident tiles, plus slack.
    Checked against the compiled kernels by benchmarks/static_report.py."""
    m, n, d = block_m, block_n, d_pad
    tiles = {"forward": stages * 2 * n * d + m * d,   # k, v pipelined; q resident
             "keys": stages * 2 * m * d + 2 * n * d,  # q, dO pipelined; k, v resident
             "queries": stages * 2 * n * d + 2 * m * d}[kind]  # k, v pipelined; q, dO resident
    return tiles * element_size + _SHARED_SLACK


def prune_configs(configs, args, kernel_name, capability, shared_per_block):
    """The configurations worth timing for a launch of the kernel named ``kernel_name`` with arguments ``args``
    (by name, constexprs included) on a GPU of compute ``capability`` (major, minor) whose blocks may use
    ``shared_per_block`` bytes of shared memory: those whose tiles fit its shared memory and its register budget
    (_REGISTER_BUDGET: beyond it they spill), and whose query block is not much longer than the queries. If none
    is left, the smallest configuration."""
    kind = _kernel_kind(kernel_name)
    d_pad, q_len_class = args["D_PAD"], args["q_len_class"]
    major = capability[0]
    budget = _REGISTER_BUDGET["forward" if kind == "forward" else "backward"][9 if major >= 9 else 8]
    element_size = max(t.element_size() for t in (args.get("Q"), args.get("PK")) if hasattr(t, "element_size"))

    def fits(c):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if _live_per_thread(kind, m, n, d_pad, c.num_warps) > budget:
            return False
        if shared_memory_estimate(kind, m, n, d_pad, c.num_stages, element_size) > shared_per_block:
            return False
        # Key blocks of 32 only where the 64-wide ones cannot be used (large head dims); at head dim 64 the 16x32
        # tile spills on sm_90 where 16x64 does not.
        return not (kind == "keys" and n < 64 and d_pad < 128)

    kept = [c for c in configs if fits(c) and c.kwargs["BLOCK_M"] <= max(16, q_len_class)]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages))]


@functools.lru_cache(maxsize=None)
def _device_limits(device: torch.device):
    """(compute capability, opt-in shared memory per block in bytes) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or {
        (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448}.get(
            (props.major, props.minor), 101376)
    return (props.major, props.minor), shared


def _autotuning() -> bool:
    """False with PTV2_TRITON_AUTOTUNE=0 (read at each new autotuning key): then no configuration is timed and each
    launch takes the first one prune_configs keeps — for correctness runs (tests, the self-check,
    compute-sanitizer) that would otherwise spend most of their time compiling every configuration."""
    import os

    return os.environ.get("PTV2_TRITON_AUTOTUNE", "1").strip() not in ("0", "")


def _prune(configs, named_args, kernel_name="", **kwargs):
    """The autotuner's early prune: :func:`prune_configs` for the device the call runs on (only the first
    configuration kept with PTV2_TRITON_AUTOTUNE=0)."""
    args = {**named_args, **kwargs}
    device = args["Q"].device
    capability, shared = _device_limits(device) if device.type == "cuda" else ((9, 0), 232448)
    kept = prune_configs(configs, args, kernel_name, capability, shared)
    return kept if _autotuning() else kept[:1]


class _Launcher:
    """A kernel autotuned over ``configs`` on a GPU; in the interpreter, run with the interpreter's block shape.
    ``kernel`` and ``configs`` stay readable (benchmarks/static_report.py compiles every configuration)."""

    def __init__(self, kernel, configs, reset_to_zero=None, extra_key=()):
        self.kernel, self.configs = kernel, configs
        if triton_interpreting():
            self._kernel, self._meta = kernel, _INTERPRETER_CONFIG
        else:
            prune = functools.partial(_prune, kernel_name=kernel.__name__)
            self._kernel = triton.autotune(configs, key=_AUTOTUNE_KEY + list(extra_key),
                                           prune_configs_by={"early_config_prune": prune},
                                           reset_to_zero=reset_to_zero)(kernel)
            self._meta = {}

    def __getitem__(self, grid):
        return functools.partial(self._kernel[grid], **self._meta)


_forward = _Launcher(_forward_kernel, _FORWARD_CONFIGS, extra_key=["PACK_GQA", "SPLIT_KV"])
_backward_keys = _Launcher(_backward_key_kernel, _KEY_GRAD_CONFIGS, reset_to_zero=["PrefixGradK", "PrefixGradV"])
_backward_queries = _Launcher(_backward_query_kernel, _QUERY_GRAD_CONFIGS)
# Memory-bound helpers: one fixed block shape each.
_ROW_BLOCK = 16 if triton_interpreting() else 64


# ----------------------------------------------------------------------------------------------------------------
# The backend: forward and backward on checked, normalized arguments (see ptv2_kernels.backends)
# ----------------------------------------------------------------------------------------------------------------

def _problem_constants(q, k, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias, causal, dropout_p):
    """Kernel arguments shared by every launch: sizes, autotuning classes and compile-time flags."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    num_prefixes, prefix_len = prefix_k.shape[0], prefix_k.shape[2]
    d_pad = max(16, triton.next_power_of_2(head_dim))
    use_tf32 = q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    sizes = (q_heads, q_len, k_len, num_prefixes, prefix_len, q_heads // kv_heads)
    classes = (triton.next_power_of_2(q_len), triton.next_power_of_2(prefix_len + k_len))
    flags = dict(HEAD_DIM=head_dim, D_PAD=d_pad, PAD_D=d_pad != head_dim, HAS_INDEX=prefix_index is not None,
                 HAS_LENGTHS=prefix_lengths is not None, HAS_KEY_PAD=attn_mask is not None and attn_mask.dim() == 2,
                 HAS_DENSE=attn_mask is not None and attn_mask.dim() == 4, HAS_BIAS=attn_bias is not None,
                 CAUSAL=causal, HAS_DROPOUT=dropout_p > 0, DOT_PRECISION="tf32" if use_tf32 else "ieee")
    return sizes, classes, flags


def _mask_args(attn_mask):
    """(key-padding mask, dense mask, their strides) as byte views of the bool mask: no copy."""
    if attn_mask is None:
        return None, None, (0, 0, 0, 0, 0, 0)
    mask = attn_mask.view(torch.uint8)
    if mask.dim() == 2:
        return mask, None, (*mask.stride(), 0, 0, 0, 0)
    return None, mask, (0, 0, *mask.stride())


def _bias_strides(attn_bias):
    """Strides of the [B, Hq, Nq, Nk] bias view (0 along broadcast dims), or zeros without a bias."""
    return (0, 0, 0, 0) if attn_bias is None else attn_bias.stride()


def _query_block_grid(q_len, q_heads, batch):
    return lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), q_heads, batch)


def _key_block_grid(prefix_len, k_len, kv_heads, batch):
    """Prefix key blocks first, then sequence key blocks: the key kernel tells them apart by program id."""
    return lambda meta: (triton.cdiv(prefix_len, meta["BLOCK_N"]) + triton.cdiv(k_len, meta["BLOCK_N"]), kv_heads,
                         batch)


def packs_query_heads(q_len: int, q_heads: int, kv_heads: int) -> bool:
    """Whether the forward gives each program all query heads of a key/value head (see ``_forward_kernel``)."""
    return q_heads > kv_heads and q_len <= PACK_GQA_MAX_QUERIES


def kv_splits(q_len: int, programs: int, keys: int, multiprocessors: int) -> int:
    """How many key/value splits a forward of few queries (decode) runs: enough programs for about two per
    multiprocessor, each split keeping at least MIN_KEYS_PER_SPLIT keys so that the merge stays cheap. One split
    (no merge) when there are many queries or already enough programs."""
    if q_len > PACK_GQA_MAX_QUERIES or programs >= multiprocessors:
        return 1
    return max(1, min(triton.cdiv(2 * multiprocessors, programs), keys // MIN_KEYS_PER_SPLIT, MAX_KV_SPLITS))


def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU; 0 elsewhere (the interpreter runs programs one by one: never split)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed, causal, scale, dropout_p, *,
            attn_bias=None):
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    out = q.new_empty(batch, q_len, q_heads, head_dim).transpose(1, 2)
    lse = q.new_empty(batch, q_heads, q_len, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    sizes, classes, flags = _problem_constants(q, k, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias,
                                               causal, dropout_p)
    key_pad, dense, mask_strides = _mask_args(attn_mask)
    pack = packs_query_heads(q_len, q_heads, kv_heads)
    if pack:
        rows, programs_per_sample = q_len * (q_heads // kv_heads), kv_heads
        classes = (triton.next_power_of_2(rows), classes[1])
    else:
        rows, programs_per_sample = q_len, q_heads
    splits = kv_splits(q_len, batch * programs_per_sample, prefix_k.shape[2] + k.shape[2], _multiprocessors(q.device))
    # With splits, each writes a float32 partial output and lse of its own; the merge writes out and lse.
    dest, dest_lse = out, lse
    if splits > 1:
        dest = torch.empty(splits, batch, q_heads, q_len, head_dim, dtype=torch.float32, device=q.device)
        dest_lse = torch.empty(splits, batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    grid = _query_block_grid(rows, programs_per_sample, batch)
    _forward[lambda meta: (grid(meta)[0] * splits, *grid(meta)[1:])](
        q, k, v, prefix_k, prefix_v, dest, dest_lse, prefix_index, prefix_lengths, key_pad, dense, attn_bias, seed,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *prefix_k.stride(), *prefix_v.stride(),
        dest.stride(0) if splits > 1 else 0, *dest.stride()[-4:-1], dest_lse.stride(0) if splits > 1 else 0,
        *mask_strides, *_bias_strides(attn_bias), *sizes, scale * LOG2E.value, dropout_p, splits, *classes,
        PACK_GQA=pack, SPLIT_KV=splits > 1, **flags)
    if splits > 1:
        _combine_splits_kernel[(triton.cdiv(q_len, _ROW_BLOCK), q_heads, batch)](
            dest, dest_lse, out, lse, *dest.stride()[:4], dest_lse.stride(0), *out.stride()[:3], q_heads, q_len,
            splits, HEAD_DIM=head_dim, D_PAD=flags["D_PAD"], BLOCK_M=_ROW_BLOCK)
    return out, lse


def backward(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed, out,
             lse, causal, scale, dropout_p, deterministic, *, attn_bias=None, grad_bias=None):
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    num_prefixes, prefix_len = prefix_k.shape[0], prefix_k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_prefix_k, d_prefix_v = torch.empty_like(prefix_k), torch.empty_like(prefix_v)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_(), d_prefix_k.zero_(), d_prefix_v.zero_()
    sizes, classes, flags = _problem_constants(q, k, prefix_k, prefix_index, prefix_lengths, attn_mask, attn_bias,
                                               causal, dropout_p)
    key_pad, dense, mask_strides = _mask_args(attn_mask)

    delta = torch.empty_like(lse)
    _backward_preprocess_kernel[(triton.cdiv(q_len, _ROW_BLOCK), q_heads, batch)](
        out, grad_out, grad_lse, delta, *out.stride()[:3], *grad_out.stride(),
        *(grad_lse.stride() if grad_lse is not None else (0, 0, 0)), q_heads, q_len,
        HEAD_DIM=head_dim, D_PAD=flags["D_PAD"], HAS_DLSE=grad_lse is not None, BLOCK_M=_ROW_BLOCK)

    # One float32 partial per bank entry (atomics) or per sample (deterministic); never-written slots stay 0.
    slots = batch if deterministic else num_prefixes
    partial_k = torch.zeros(slots, kv_heads, prefix_len, head_dim, dtype=torch.float32, device=q.device)
    partial_v = torch.zeros_like(partial_k)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *prefix_k.stride(), *prefix_v.stride(),
              *grad_out.stride())
    if prefix_len + k_len > 0:
        _backward_keys[_key_block_grid(prefix_len, k_len, kv_heads, batch)](
            q, k, v, prefix_k, prefix_v, grad_out, lse, delta, dk, dv, partial_k, partial_v, prefix_index,
            prefix_lengths, key_pad, dense, attn_bias, seed, *common, *dk.stride()[:3], *dv.stride()[:3],
            *mask_strides, *_bias_strides(attn_bias), *sizes, scale * LOG2E.value, scale, dropout_p, *classes,
            DETERMINISTIC=deterministic, **flags)
    bias_grad = grad_bias is not None and grad_bias.numel() > 0
    _backward_queries[_query_block_grid(q_len, q_heads, batch)](
        q, k, v, prefix_k, prefix_v, grad_out, lse, delta, dq, prefix_index, prefix_lengths, key_pad, dense,
        attn_bias, grad_bias if bias_grad else None, seed, *common, *dq.stride()[:3], *mask_strides,
        *_bias_strides(attn_bias), *(grad_bias.stride() if bias_grad else (0, 0, 0, 0)), *sizes,
        scale * LOG2E.value, scale, dropout_p, *classes, BIAS_GRAD=bias_grad, **flags)
    if prefix_len > 0:
        _prefix_grad_finalize_kernel[(triton.cdiv(prefix_len, _ROW_BLOCK), kv_heads, num_prefixes)](
            partial_k, partial_v, d_prefix_k, d_prefix_v, prefix_index, *d_prefix_k.stride(), *d_prefix_v.stride(),
            batch, kv_heads, prefix_len, HEAD_DIM=head_dim, D_PAD=flags["D_PAD"],
            HAS_INDEX=prefix_index is not None, SUM_SAMPLES=deterministic, BLOCK_N=_ROW_BLOCK)
    return dq, dk, dv, d_prefix_k, d_prefix_v
