"""Prefix attention in Triton: the kernels and their device helpers (the launchers, configurations and the backend's
``forward`` / ``backward`` are in :mod:`ptv2_kernels.triton.prefix_attention`).

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
  seed, so backward regenerates exactly the forward's mask.
* Score options — HAS_SOFTCAP caps every key's score to cap · tanh(scale · q·k / cap) before the bias, in all three
  kernels (the backward multiplies the scores' gradient by 1 − tanh² on its way to dQ/dK; the bias gradient is
  taken before). HAS_SINKS adds each head's sink logit to the forward's softmax denominator; the backward needs no
  flag, its probabilities coming from the lse, which includes the sink (the sinks' gradient, −Σ p_sink · Δ over
  the rows, is a reduction the launcher runs).
* Biases — HAS_BIAS adds a ``[B, Hq, Nq, Nk]`` view to the sequence keys' scores, HAS_PREFIX_BIAS a
  ``[B, Hq, Nq, P]`` view to the prefix keys' (a prefix placed in a model's cache would get a position bias there:
  T5's, ALiBi's). Each stage reads its own; the dQ kernel writes each one's gradient where asked (BIAS_GRAD,
  PREFIX_BIAS_GRAD).
* Sliding window — HAS_WINDOW limits the sequence keys to each query's window (runtime window_left/window_right,
  both bounded by the host). The forward and dQ kernels visit only the key blocks their query block's windows
  reach and the dK/dV kernel only the query rows whose windows reach its key block, so the cost follows the
  window, not Nk; the blocks (rows) inside every window run without masks. The prefix is not subject to it.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
def _visible(rows, cols, q_len, k_len, diag, key_pad, stride_kpn, dense, stride_mm, stride_mn, window_left,
             window_right, CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr,
             HAS_WINDOW: tl.constexpr):
    """Which (query, key) pairs may attend. ``rows`` and ``cols`` broadcast to a 2-D block in either orientation,
    so the forward's [queries, keys] tiles and the dK/dV kernel's [keys, queries] tiles share this one rule.
    HAS_WINDOW: key j is visible to query i iff i + diag - window_left <= j <= i + diag + window_right (the host
    turns an unbounded side into a bound past every key)."""
    visible = cols < k_len
    if CAUSAL:
        visible = visible & (cols <= rows + diag)
    if HAS_WINDOW:
        visible = visible & (cols >= rows + diag - window_left) & (cols <= rows + diag + window_right)
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
def _tanh(x):
    """tanh in float32 from exp2 (Triton's interpreter has no libdevice): an odd Taylor polynomial where |x| < 1/4
    (there (1 - e) / (1 + e) would cancel; the first term left out is below 1e-8 relative), else
    sign(x) (1 - e) / (1 + e) with e = exp(-2|x|)."""
    magnitude = tl.abs(x)
    e = tl.math.exp2(magnitude * (-2.0 * LOG2E))
    far = (1.0 - e) / (1.0 + e)
    x2 = x * x
    near = magnitude * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    t = tl.where(magnitude < 0.25, near, far)
    return tl.where(x < 0.0, -t, t)


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


@triton.jit
def _window_key_range(first_query, end_query, q_len, diag, k_len, window_left, window_right, BLOCK_N: tl.constexpr):
    """For queries [first_query, end_query) under a window (window_right already 0 with causal): the start of the
    first key block any of them sees, the start and end of the key blocks all of them see whole, and the end of
    the keys any of them sees. Key blocks outside [start, end) are skipped: the cost is the window's, not Nk's."""
    last_query = tl.minimum(end_query, q_len) - 1
    seq_start = tl.minimum(tl.maximum(first_query + diag - window_left, 0), k_len) // BLOCK_N * BLOCK_N
    seq_end = tl.minimum(tl.maximum(last_query + diag + window_right + 1, 0), k_len)
    full_lo = tl.cdiv(tl.maximum(last_query + diag - window_left, 0), BLOCK_N) * BLOCK_N
    full_hi = tl.maximum(tl.minimum(first_query + diag + window_right + 1, k_len), 0) // BLOCK_N * BLOCK_N
    return seq_start, full_lo, full_hi, seq_end


@triton.jit
def _varlen_block(pid, CuSeqlens, num_seqs, search_steps, BLOCK: tl.constexpr):
    """The packed sequence s and its block j that program ``pid`` of a variable-length launch serves.

    Sequence s owns programs [start(s), start(s + 1)) with start(s) = cu[s] // BLOCK + s: strictly increasing,
    at least cdiv(len(s), BLOCK) programs each and start(S) = total // BLOCK + S in all, so the grid needs no
    padding to the longest sequence, only one spare program per sequence at most (which returns at once). s is
    found by a binary search over cu (``search_steps`` = ceil(log2 S) halvings), in range whatever cu holds."""
    lo = pid * 0
    hi = lo + num_seqs
    for _ in range(0, search_steps):
        mid = (lo + hi) // 2
        take = tl.load(CuSeqlens + mid) // BLOCK + mid <= pid
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid)
    return lo.to(tl.int64), pid - (tl.load(CuSeqlens + lo) // BLOCK + lo)


@triton.jit
def _sequence_span(CuSeqlens, s, total):
    """(first token, length) of packed sequence s, clamped to [0, total]: the host checks cu, and the device
    never reads outside the packed tensors even if it was not checked (inside a CUDA graph capture)."""
    start = tl.minimum(tl.maximum(tl.load(CuSeqlens + s), 0), total)
    end = tl.minimum(tl.maximum(tl.load(CuSeqlens + s + 1), start), total)
    return start.to(tl.int64), (end - start).to(tl.int32)


@triton.jit
def _varlen_query_block(pid, CuSeqQ, CuSeqK, num_seqs, search_steps, total_q, total_k, BLOCK_M: tl.constexpr):
    """(sequence, its query block, first query, query count, first key, key count) of a packed query program."""
    s, block = _varlen_block(pid, CuSeqQ, num_seqs, search_steps, BLOCK_M)
    q_start, q_len = _sequence_span(CuSeqQ, s, total_q)
    k_start, k_len = _sequence_span(CuSeqK, s, total_k)
    return s, block, q_start, q_len, k_start, k_len


@triton.jit
def _row_base(b, h, q_heads, q_len, q_start, total_q, VARLEN: tl.constexpr):
    """Where query 0 of (sample b, head h) sits in the lse and Δ buffers: ``[B, Hq, Nq]``, or ``[Hq, total_q]``
    for packed sequences (query 0 of sequence b is token ``q_start``)."""
    if VARLEN:
        base = h.to(tl.int64) * total_q + q_start
    else:
        base = (b * q_heads + h) * q_len
    return base


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _attend(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
            start, end, k_len, offs_m, offs_d, offs_dv, q_len, diag,
            key_pad, stride_kpn, dense, stride_mm, stride_mn,
            seed, stream, col_base, cols_total, dropout_p, qk_scale, cap_log2, bias, stride_bm, stride_bn,
            k_desc, v_desc, window_left, window_right,
            HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, PAD_DV: tl.constexpr,
            BLOCK_N: tl.constexpr, MASK_BOUNDS: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
            DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            HAS_WINDOW: tl.constexpr, USE_TMA: tl.constexpr = False):
    """Online-softmax update of (acc, l_i, m_i) with key blocks [start, end) of one key/value source. USE_TMA: the
    key/value tiles come through the tensor descriptors ``k_desc``/``v_desc`` (Hopper's TMA copies, which fill the
    rows and head-dim columns past the source's bounds with zeros) instead of masked pointer loads."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # 1. scores of the block, in log2 units; keys of another dtype (a float32 prefix) are converted on load
        if USE_TMA:
            k_t = tl.trans(k_desc.load([start_n, 0])).to(q.dtype)
        else:
            k_t = _load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, offs_n[None, :] < k_len,
                        offs_d[:, None] < HEAD_DIM, MASK_BOUNDS, PAD_D).to(q.dtype)
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if HAS_SOFTCAP:  # qk_scale is scale / cap here: cap * tanh(scale * q.k / cap), in log2 units
            scores = _tanh(scores) * cap_log2
        if HAS_BIAS:
            scores = _biased(scores, bias, offs_m[:, None], offs_n[None, :], q_len, k_len, stride_bm, stride_bn)
        if MASK_BOUNDS or CAUSAL or HAS_KEY_PAD or HAS_DENSE or HAS_WINDOW:
            visible = _visible(offs_m[:, None], offs_n[None, :], q_len, k_len, diag, key_pad, stride_kpn, dense,
                               stride_mm, stride_mn, window_left, window_right, CAUSAL, HAS_KEY_PAD, HAS_DENSE,
                               HAS_WINDOW)
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
        if USE_TMA:
            v = v_desc.load([start_n, 0]).to(q.dtype)
        else:
            v = _load(V + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd, offs_n[:, None] < k_len,
                      offs_dv[None, :] < HEAD_DIM_V, MASK_BOUNDS, PAD_DV).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(probs.to(q.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend_staged(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                   lo, hi, full_lo, full_end, k_len, offs_m, offs_d, offs_dv, q_len, diag,
                   key_pad, stride_kpn, dense, stride_mm, stride_mn,
                   seed, stream, col_base, cols_total, dropout_p, qk_scale, cap_log2, bias, stride_bm, stride_bn,
                   k_desc, v_desc, window_left, window_right,
                   HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, PAD_DV: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, USE_TMA: tl.constexpr = False):
    """Key blocks [lo, hi) of one source in stages: those in [full_lo, full_end), which every query of the block
    sees whole, without bounds, causal or window masks; the rest (the window's leading edge before ``full_lo``,
    with HAS_WINDOW only; the ragged end, the causal diagonal, the window's trailing edge) with them."""
    whole_lo = tl.minimum(lo, hi)
    if HAS_WINDOW:
        whole_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    whole_hi = tl.maximum(tl.minimum(hi, full_end), whole_lo)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                            whole_lo, whole_hi, k_len, offs_m, offs_d, offs_dv, q_len, diag,
                            key_pad, stride_kpn, dense, stride_mm, stride_mn,
                            seed, stream, col_base, cols_total, dropout_p, qk_scale, cap_log2,
                            bias, stride_bm, stride_bn, k_desc, v_desc, window_left, window_right,
                            HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, HEAD_DIM_V=HEAD_DIM_V, PAD_DV=PAD_DV,
                            BLOCK_N=BLOCK_N, MASK_BOUNDS=False, CAUSAL=False,
                            HAS_KEY_PAD=HAS_KEY_PAD, HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT,
                            DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS, HAS_SOFTCAP=HAS_SOFTCAP, HAS_WINDOW=False,
                            USE_TMA=USE_TMA)
    # the masked edges: the window's leading one [lo, whole_lo) (compiled only with a window), the trailing one
    for edge in tl.static_range(1 - HAS_WINDOW, 2):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                lo if edge == 0 else whole_hi, whole_lo if edge == 0 else hi, k_len, offs_m, offs_d,
                                offs_dv, q_len, diag, key_pad, stride_kpn, dense, stride_mm, stride_mn,
                                seed, stream, col_base, cols_total, dropout_p, qk_scale, cap_log2,
                                bias, stride_bm, stride_bn, k_desc, v_desc, window_left, window_right,
                                HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, HEAD_DIM_V=HEAD_DIM_V, PAD_DV=PAD_DV,
                                BLOCK_N=BLOCK_N, MASK_BOUNDS=True, CAUSAL=CAUSAL,
                                HAS_KEY_PAD=HAS_KEY_PAD, HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT,
                                DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS, HAS_SOFTCAP=HAS_SOFTCAP,
                                HAS_WINDOW=HAS_WINDOW, USE_TMA=USE_TMA)
    return acc, l_i, m_i


@triton.jit
def _forward_kernel(
    Q, K, V, PK, PV, Out, Lse, PrefixIndex, PrefixLengths, KeyPad, Dense, Bias, Seed, CuSeqQ, CuSeqK, Sinks,
    PrefixBias,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd, stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_os, stride_ob, stride_oh, stride_om, stride_ls, stride_kpb, stride_kpn, stride_mb, stride_mh, stride_mm,
    stride_mn, stride_bb, stride_bh, stride_bm, stride_bn, stride_pbb, stride_pbh, stride_pbm, stride_pbn,
    q_heads, q_len, k_len, num_prefixes, prefix_len, group, window_left, window_right, qk_scale, cap_log2, dropout_p,
    num_splits,
    num_seqs, search_steps, total_q, total_k, q_len_class, k_len_class,  # the last two: autotuning keys only
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    DV_PAD: tl.constexpr, PAD_DV: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, PACK_GQA: tl.constexpr,
    SPLIT_KV: tl.constexpr, VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_PREFIX_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """One block of query rows of one sample. A row is a query of the program's query head, or, with PACK_GQA
    (few queries, several query heads per key/value head), a (query, head) pair of the program's key/value head:
    row r is query r // group of query head hkv·group + r % group. Packing fills the block with the group's heads
    so that each key/value tile is loaded once for all of them instead of once per head.

    With SPLIT_KV (too few programs to fill the GPU), program (block, split) attends to the split-th of
    ``num_splits`` equal runs of key blocks of [prefix blocks ; sequence blocks] and writes its own normalized
    output and lse at offsets ``split · stride_os`` / ``split · stride_ls``; ``_combine_splits_kernel`` merges
    them. An additive bias (HAS_BIAS) applies to the sequence keys' scores, a second one (HAS_PREFIX_BIAS,
    ``[B, Hq, Nq, P]``) to the prefix keys' scores. HAS_SOFTCAP caps every key's
    score before the bias (``qk_scale`` is then scale / cap, in natural units, and ``cap_log2`` = cap · log2 e);
    HAS_SINKS adds ``exp(Sinks[h])`` to each row's denominator (with SPLIT_KV, in the merge of the splits).
    HAS_WINDOW limits the sequence keys to each query's window (see ``_visible``); the key blocks outside the
    block's windows are never visited (with SPLIT_KV, the splits share the blocks from the first one seen).

    USE_TMA (Hopper; an autotuning configuration): the sequence's key/value tiles come through tensor descriptors
    made here (TMA copies) rather than masked pointer loads; the prefix's (a bank entry of any strides and dtype)
    keep the pointer loads.
    q and k have head dim HEAD_DIM (padded to D_PAD), v, the accumulator and the output HEAD_DIM_V (DV_PAD),
    which may differ (multi-head latent attention); equal, the two are one.

    With VARLEN the samples are the packed sequences of ``[total, H, D]`` tensors (batch strides 0): program
    ``pid`` serves the query block ``_varlen_block`` gives, ``q_len``/``k_len`` arrive as the longest sequence's
    lengths (dropout numbers a row's columns up to ``P + k_len``, as in the padded batch) and become the
    sequence's own."""
    pid_m = tl.program_id(0)
    split = 0
    if SPLIT_KV:
        split = pid_m % num_splits
        pid_m = pid_m // num_splits
    b = tl.program_id(2).to(tl.int64)
    cols_total = prefix_len + k_len
    q_start = b * 0
    k_start = b * 0
    if VARLEN:
        b, pid_m, q_start, q_len, k_start, k_len = _varlen_query_block(pid_m, CuSeqQ, CuSeqK, num_seqs,
                                                                       search_steps, total_q, total_k, BLOCK_M)
        if (pid_m < 0) | (pid_m * BLOCK_M >= q_len):
            return
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
    offs_dv = tl.arange(0, DV_PAD)
    q = _load(Q + b * stride_qb + q_start * stride_qm + head_col * stride_qh + offs_m[:, None] * stride_qm
              + offs_d[None, :], offs_m[:, None] < q_len, offs_d[None, :] < HEAD_DIM, True, PAD_D)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    stream = (b * q_heads + head_col).to(tl.int32)
    key_pad = _operand_base(KeyPad, b, 0, stride_kpb, 0, HAS_KEY_PAD)
    dense = _operand_base(Dense, b, head_col, stride_mb, stride_mh, HAS_DENSE)
    bias = _operand_base(Bias, b, head_col, stride_bb, stride_bh, HAS_BIAS)
    prefix_bias = _operand_base(PrefixBias, b, head_col, stride_pbb, stride_pbh, HAS_PREFIX_BIAS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)

    # This program's key blocks: all of both sources, or one split's run of [prefix blocks ; sequence blocks].
    diag = k_len - q_len
    seq_full, seq_end = _sequence_key_range(first_query, end_query, diag, k_len, BLOCK_N, CAUSAL)
    seq_start = 0
    window_full = 0
    if HAS_WINDOW:
        seq_start, window_full, seq_full, seq_end = _window_key_range(first_query, end_query, q_len, diag, k_len,
                                                                      window_left, window_right, BLOCK_N)
    prefix_lo, prefix_hi = 0, prefix_keys
    seq_lo, seq_hi = seq_start, seq_end
    if SPLIT_KV:
        prefix_span = tl.cdiv(prefix_len, BLOCK_N) * BLOCK_N
        per_split = tl.cdiv(prefix_span // BLOCK_N + tl.cdiv(k_len - seq_start, BLOCK_N), num_splits) * BLOCK_N
        lo = split * per_split
        prefix_lo, prefix_hi = tl.minimum(lo, prefix_span), tl.minimum(lo + per_split, prefix_keys)
        seq_lo = seq_start + tl.maximum(lo - prefix_span, 0)
        seq_hi = tl.minimum(seq_start + lo + per_split - prefix_span, seq_end)

    # Stage 1: the prefix. Always visible (no mask, no causal rule; only its own bias): only its last partial block
    # is masked, and only for bounds.
    PKb = PK + entry * stride_pkt + hkv * stride_pkh
    PVb = PV + entry * stride_pvt + hkv * stride_pvh
    acc, l_i, m_i = _attend_staged(acc, l_i, m_i, q, PKb, PVb, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                                   prefix_lo, prefix_hi, prefix_lo, prefix_keys // BLOCK_N * BLOCK_N, prefix_keys,
                                   offs_m, offs_d, offs_dv, q_len, 0, key_pad, stride_kpn, dense, stride_mm,
                                   stride_mn, seed, stream, 0, cols_total, dropout_p, qk_scale, cap_log2,
                                   prefix_bias, stride_pbm, stride_pbn, None, None, window_left, window_right,
                                   HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, HEAD_DIM_V=HEAD_DIM_V, PAD_DV=PAD_DV,
                                   BLOCK_N=BLOCK_N, CAUSAL=False, HAS_KEY_PAD=False,
                                   HAS_DENSE=False, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION,
                                   HAS_BIAS=HAS_PREFIX_BIAS, HAS_SOFTCAP=HAS_SOFTCAP, HAS_WINDOW=False)

    # Stage 2: the sequence, with the caller's masks, bias and causal rule.
    Kb = K + b * stride_kb + k_start * stride_kn + hkv * stride_kh
    Vb = V + b * stride_vb + k_start * stride_vn + hkv * stride_vh
    k_desc, v_desc = None, None
    if USE_TMA:  # a descriptor needs a non-empty shape; with no keys it is made but never read
        k_rows = tl.maximum(k_len, 1)
        k_desc = tl.make_tensor_descriptor(Kb, shape=[k_rows, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, D_PAD])
        v_desc = tl.make_tensor_descriptor(Vb, shape=[k_rows, HEAD_DIM_V], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, DV_PAD])
    acc, l_i, m_i = _attend_staged(acc, l_i, m_i, q, Kb, Vb, stride_kn, 1, stride_vn, 1,
                                   seq_lo, seq_hi, window_full, seq_full, k_len, offs_m, offs_d, offs_dv, q_len,
                                   diag, key_pad, stride_kpn, dense, stride_mm, stride_mn,
                                   seed, stream, prefix_len, cols_total, dropout_p, qk_scale, cap_log2,
                                   bias, stride_bm, stride_bn, k_desc, v_desc, window_left, window_right,
                                   HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, HEAD_DIM_V=HEAD_DIM_V, PAD_DV=PAD_DV,
                                   BLOCK_N=BLOCK_N, CAUSAL=CAUSAL, HAS_KEY_PAD=HAS_KEY_PAD, HAS_DENSE=HAS_DENSE,
                                   HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS,
                                   HAS_SOFTCAP=HAS_SOFTCAP, HAS_WINDOW=HAS_WINDOW, USE_TMA=USE_TMA)

    # Epilogue: normalize; a query that saw no key gets 0 and lse = -inf (= its sink with one). Dropout's 1/(1-p)
    # is applied once here.
    if HAS_SINKS and not SPLIT_KV:
        acc, l_i, m_i = _add_sink(acc, l_i, m_i, Sinks, h)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    out = tl.where(index_ok, out, float("nan"))
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    row_ok = offs_m < q_len
    tl.store(Out + split * stride_os + b * stride_ob + q_start * stride_om + head_col * stride_oh
             + offs_m[:, None] * stride_om + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + split * stride_ls + _row_base(b, h, q_heads, q_len, q_start, total_q, VARLEN) + offs_m, lse,
             mask=row_ok)


@triton.jit
def _add_sink(acc, l_i, m_i, Sinks, h):
    """The online-softmax state (log2 units) with the sink logit of head ``h`` (a scalar or one per row) in the
    denominator: a key whose value is zero. A row that saw no key ends with l = 1 at m = sink, so lse = sink."""
    sink = tl.load(Sinks + h) * LOG2E
    m_new = tl.maximum(m_i, sink)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a sink of -inf on a row that saw nothing
    alpha = tl.math.exp2(m_i - shift)
    return acc * alpha[:, None], l_i * alpha + tl.math.exp2(sink - shift), m_new


@triton.jit
def _combine_splits_kernel(
    PartialOut, PartialLse, Out, Lse, Sinks, stride_ps, stride_pb, stride_ph, stride_pm, stride_ls,
    stride_ob, stride_oh, stride_om, q_heads, q_len, num_splits,
    HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the splits of a split-KV forward: lse = log Σ exp(lse_s), out = Σ exp(lse_s − lse) · out_s.
    Splits that saw no key (lse_s = −inf) weigh 0; a row no split saw keeps out 0 and lse −inf. With HAS_SINKS the
    head's sink joins the sum as one more term of output 0."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DV_PAD)
    row_ok = offs_m < q_len
    lse_rows = PartialLse + (b * q_heads + h) * q_len + offs_m
    out_rows = PartialOut + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_pm + offs_d[None, :]
    out_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM_V)
    top = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        top = tl.maximum(top, tl.load(lse_rows + s * stride_ls, mask=row_ok, other=float("-inf")))
    if HAS_SINKS:
        sink = tl.load(Sinks + h)
        top = tl.maximum(top, sink)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS:
        total += tl.exp(sink - shift)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
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
    HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Δ = rowsum(dO · O) − dlse: the softmax backward's row term (an lse gradient adds to every probability)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DV_PAD)
    mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM_V)
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
                          start, end, offs_n, offs_d, offs_dv, q_len, diag,
                          key_pad, stride_kpn, dense, stride_mm, stride_mn, k_len,
                          seed, stream, col_base, cols_total, dropout_p, qk_scale, cap_log2, bias, stride_bm, stride_bn,
                          window_left, window_right,
                          HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                          PAD_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr,
                          HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """dK, dV of one key block from query blocks [start, end) of one query head; tiles are [keys, queries]."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        q = _load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], row_ok[:, None], offs_d[None, :] < HEAD_DIM,
                  True, PAD_D)
        d_out = _load(DOut + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod, row_ok[:, None],
                      offs_dv[None, :] < HEAD_DIM_V, True, PAD_DV).to(q.dtype)
        lse = _lse_log2(Lse, row_base + offs_m, row_ok)
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        if HAS_SOFTCAP:
            capped_t = _tanh(scores_t)
            scores_t = capped_t * cap_log2
        if HAS_BIAS:
            scores_t = _biased(scores_t, bias, offs_m[None, :], offs_n[:, None], q_len, k_len, stride_bm, stride_bn)
        probs_t = tl.math.exp2(scores_t - lse[None, :])
        if CAUSAL or HAS_KEY_PAD or HAS_DENSE or HAS_WINDOW:
            visible = _visible(offs_m[None, :], offs_n[:, None], q_len, k_len, diag, key_pad, stride_kpn, dense,
                               stride_mm, stride_mn, window_left, window_right, CAUSAL, HAS_KEY_PAD, HAS_DENSE,
                               HAS_WINDOW)
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
        if HAS_SOFTCAP:  # through the cap: d tanh = 1 - tanh²
            d_scores_t = d_scores_t * (1.0 - capped_t * capped_t)
        dk += tl.dot(d_scores_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _backward_key_kernel(
    Q, K, V, PK, PV, DOut, Lse, Delta, DK, DV, PrefixGradK, PrefixGradV,
    PrefixIndex, PrefixLengths, KeyPad, Dense, Bias, Seed, CuSeqQ, CuSeqK, PrefixBias,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd, stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod, stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn, stride_kpb, stride_kpn, stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_pbb, stride_pbh, stride_pbm, stride_pbn,
    q_heads, q_len, k_len, num_prefixes, prefix_len, group, window_left, window_right, qk_scale, cap_log2, sm_scale,
    dropout_p, num_seqs, search_steps, total_q, total_k, q_len_class, k_len_class,  # the last two: autotuning keys
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    DV_PAD: tl.constexpr, PAD_DV: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PREFIX_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK/dV of one key block (prefix blocks first, then sequence blocks) of one key/value head of one sample.

    With VARLEN (packed sequences, see ``_forward_kernel``) the first ``num_seqs · cdiv(P, BLOCK_N)`` programs
    are the sequences' prefix blocks, the rest their sequence key blocks as ``_varlen_block`` numbers them."""
    pid_n = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    prefix_blocks = tl.cdiv(prefix_len, BLOCK_N)
    cols_total = prefix_len + k_len
    q_start = b * 0
    k_start = b * 0
    if VARLEN:
        prefix_programs = num_seqs * prefix_blocks
        if pid_n < prefix_programs:
            b = (pid_n // prefix_blocks).to(tl.int64)
            pid_n = pid_n % prefix_blocks
        else:
            b, pid_n = _varlen_block(pid_n - prefix_programs, CuSeqK, num_seqs, search_steps, BLOCK_N)
            pid_n = pid_n + prefix_blocks
        q_start, q_len = _sequence_span(CuSeqQ, b, total_q)
        k_start, k_len = _sequence_span(CuSeqK, b, total_k)
        if (pid_n < 0) | ((pid_n >= prefix_blocks) & ((pid_n - prefix_blocks) * BLOCK_N >= k_len)):
            return
    is_prefix = pid_n < prefix_blocks
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    d_ok = offs_d[None, :] < HEAD_DIM
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], dtype=tl.float32)

    if is_prefix:
        entry, prefix_keys, index_ok = _bank_entry(PrefixIndex, PrefixLengths, b, num_prefixes, prefix_len,
                                                   HAS_INDEX, HAS_LENGTHS)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = offs_n[:, None] < prefix_keys
        if pid_n * BLOCK_N < prefix_keys:
            k = _load(PK + entry * stride_pkt + hkv * stride_pkh + offs_n[:, None] * stride_pkn
                      + offs_d[None, :] * stride_pkd, key_ok, d_ok, True, PAD_D).to(Q.dtype.element_ty)
            v = _load(PV + entry * stride_pvt + hkv * stride_pvh + offs_n[:, None] * stride_pvn
                      + offs_dv[None, :] * stride_pvd, key_ok, dv_ok, True, PAD_DV).to(Q.dtype.element_ty)
            for g in range(0, group):
                h = hkv * group + g
                dk, dv = _accumulate_key_grads(
                    dk, dv, k, v, Q + b * stride_qb + q_start * stride_qm + h * stride_qh,
                    DOut + b * stride_dob + q_start * stride_dom + h * stride_doh, Lse, Delta, stride_qm, stride_dom,
                    stride_dod, _row_base(b, h, q_heads, q_len, q_start, total_q, VARLEN), 0, q_len, offs_n, offs_d,
                    offs_dv, q_len, 0, KeyPad, stride_kpn, Dense, stride_mm, stride_mn, prefix_keys, seed,
                    (b * q_heads + h).to(tl.int32), 0, cols_total, dropout_p, qk_scale, cap_log2,
                    _operand_base(PrefixBias, b, h, stride_pbb, stride_pbh, HAS_PREFIX_BIAS), stride_pbm, stride_pbn,
                    window_left, window_right,
                    HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, HEAD_DIM_V=HEAD_DIM_V, PAD_DV=PAD_DV,
                    BLOCK_M=BLOCK_M, CAUSAL=False, HAS_KEY_PAD=False,
                    HAS_DENSE=False, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_PREFIX_BIAS,
                    HAS_SOFTCAP=HAS_SOFTCAP, HAS_WINDOW=False)
            # One sample's share of the bank entry's gradient: [S, Hkv, P, D] float32 buffers indexed by the
            # entry (atomics) or by the sample (deterministic, summed in order by the finalize kernel).
            slot = entry
            if DETERMINISTIC:
                slot = b
            rows = (slot * tl.num_programs(1) + hkv) * prefix_len + offs_n[:, None]
            offsets_k = rows * HEAD_DIM + offs_d[None, :]
            offsets_v = rows * HEAD_DIM_V + offs_dv[None, :]
            if DETERMINISTIC:
                tl.store(PrefixGradK + offsets_k, dk * sm_scale, mask=key_ok & d_ok)
                tl.store(PrefixGradV + offsets_v, dv, mask=key_ok & dv_ok)
            else:
                tl.atomic_add(PrefixGradK + offsets_k, dk * sm_scale, mask=key_ok & d_ok, sem="relaxed")
                tl.atomic_add(PrefixGradV + offsets_v, dv, mask=key_ok & dv_ok, sem="relaxed")
    else:
        start_n = (pid_n - prefix_blocks) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n[:, None] < k_len
        k = _load(K + b * stride_kb + k_start * stride_kn + hkv * stride_kh + offs_n[:, None] * stride_kn
                  + offs_d[None, :], key_ok, d_ok, True, PAD_D)
        v = _load(V + b * stride_vb + k_start * stride_vn + hkv * stride_vh + offs_n[:, None] * stride_vn
                  + offs_dv[None, :], key_ok, dv_ok, True, PAD_DV)
        key_pad = _operand_base(KeyPad, b, 0, stride_kpb, 0, HAS_KEY_PAD)
        diag = k_len - q_len
        # Causal: queries before first_row see none of these keys; from full_row on, they see all of them.
        # With a window (its right side 0 under causal) only the rows [first_row, row_end) see any of them, and
        # those in [full_row, whole_end) see all of them: the rows outside the window are never visited.
        row_end = q_len
        whole_end = q_len
        if HAS_WINDOW:
            first_row = tl.maximum(start_n - diag - window_right, 0) // BLOCK_M * BLOCK_M
            row_end = tl.minimum(tl.maximum(start_n + BLOCK_N + window_left - diag, 0), q_len)
            full_row = tl.minimum(tl.maximum(
                tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - window_right, 0), BLOCK_M) * BLOCK_M, first_row),
                row_end)
            whole_end = tl.minimum(tl.maximum(tl.maximum(start_n + window_left - diag + 1, 0) // BLOCK_M * BLOCK_M,
                                              full_row), row_end)
        elif CAUSAL:
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
            q_head = Q + b * stride_qb + q_start * stride_qm + h * stride_qh
            do_head = DOut + b * stride_dob + q_start * stride_dom + h * stride_doh
            row_base = _row_base(b, h, q_heads, q_len, q_start, total_q, VARLEN)
            stream = (b * q_heads + h).to(tl.int32)
            # the query blocks on the causal diagonal (or the window's edge) with the rule, those past it without
            dk, dv = _accumulate_key_grads(
                dk, dv, k, v, q_head, do_head, Lse, Delta, stride_qm, stride_dom, stride_dod, row_base,
                first_row, tl.minimum(full_row, q_len), offs_n, offs_d, offs_dv, q_len, diag, key_pad, stride_kpn,
                dense, stride_mm, stride_mn, k_len, seed, stream, prefix_len, cols_total, dropout_p, qk_scale,
                cap_log2, bias, stride_bm, stride_bn, window_left, window_right, HEAD_DIM=HEAD_DIM, PAD_D=PAD_D,
                HEAD_DIM_V=HEAD_DIM_V, PAD_DV=PAD_DV, BLOCK_M=BLOCK_M, CAUSAL=CAUSAL, HAS_KEY_PAD=HAS_KEY_PAD,
                HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS,
                HAS_SOFTCAP=HAS_SOFTCAP, HAS_WINDOW=HAS_WINDOW)
            dk, dv = _accumulate_key_grads(
                dk, dv, k, v, q_head, do_head, Lse, Delta, stride_qm, stride_dom, stride_dod, row_base,
                full_row, whole_end, offs_n, offs_d, offs_dv, q_len, diag, key_pad, stride_kpn, dense,
                stride_mm, stride_mn, k_len, seed, stream, prefix_len, cols_total, dropout_p, qk_scale, cap_log2,
                bias, stride_bm, stride_bn, window_left, window_right, HEAD_DIM=HEAD_DIM, PAD_D=PAD_D,
                HEAD_DIM_V=HEAD_DIM_V, PAD_DV=PAD_DV, BLOCK_M=BLOCK_M, CAUSAL=False, HAS_KEY_PAD=HAS_KEY_PAD,
                HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS,
                HAS_SOFTCAP=HAS_SOFTCAP, HAS_WINDOW=False)
            if HAS_WINDOW:  # the window's trailing edge: the rows whose window starts inside this block
                dk, dv = _accumulate_key_grads(
                    dk, dv, k, v, q_head, do_head, Lse, Delta, stride_qm, stride_dom, stride_dod, row_base,
                    whole_end, row_end, offs_n, offs_d, offs_dv, q_len, diag, key_pad, stride_kpn, dense,
                    stride_mm, stride_mn, k_len, seed, stream, prefix_len, cols_total, dropout_p, qk_scale,
                    cap_log2, bias, stride_bm, stride_bn, window_left, window_right, HEAD_DIM=HEAD_DIM, PAD_D=PAD_D,
                    HEAD_DIM_V=HEAD_DIM_V, PAD_DV=PAD_DV, BLOCK_M=BLOCK_M, CAUSAL=CAUSAL, HAS_KEY_PAD=HAS_KEY_PAD,
                    HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS,
                    HAS_SOFTCAP=HAS_SOFTCAP, HAS_WINDOW=True)
        grad_ok = key_ok & d_ok
        tl.store(DK + b * stride_dkb + k_start * stride_dkn + hkv * stride_dkh + offs_n[:, None] * stride_dkn
                 + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok & d_ok)
        tl.store(DV + b * stride_dvb + k_start * stride_dvn + hkv * stride_dvh + offs_n[:, None] * stride_dvn
                 + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=key_ok & dv_ok)


@triton.jit
def _accumulate_query_grad(dq, q, d_out, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                           start, end, k_len, offs_m, offs_d, offs_dv, q_len, diag,
                           key_pad, stride_kpn, dense, stride_mm, stride_mn,
                           seed, stream, col_base, cols_total, dropout_p, qk_scale, cap_log2,
                           bias, stride_bm, stride_bn, dbias, stride_dbm, stride_dbn, window_left, window_right,
                           HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                           PAD_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                           MASK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_PAD: tl.constexpr,
                           HAS_DENSE: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                           HAS_WINDOW: tl.constexpr):
    """dQ of one query block from key blocks [start, end) of one key/value source; with BIAS_GRAD, also the
    gradient of the additive bias (the scores' gradient, in natural units) of these (query, key) pairs."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n[:, None] < k_len,
                  offs_d[None, :] < HEAD_DIM, MASK_BOUNDS, PAD_D).to(q.dtype)
        v = _load(V + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd, offs_n[:, None] < k_len,
                  offs_dv[None, :] < HEAD_DIM_V, MASK_BOUNDS, PAD_DV).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_SOFTCAP:
            capped = _tanh(scores)
            scores = capped * cap_log2
        if HAS_BIAS:
            scores = _biased(scores, bias, offs_m[:, None], offs_n[None, :], q_len, k_len, stride_bm, stride_bn)
        probs = tl.math.exp2(scores - lse[:, None])
        if MASK_BOUNDS or CAUSAL or HAS_KEY_PAD or HAS_DENSE or HAS_WINDOW:
            visible = _visible(offs_m[:, None], offs_n[None, :], q_len, k_len, diag, key_pad, stride_kpn, dense,
                               stride_mm, stride_mn, window_left, window_right, CAUSAL, HAS_KEY_PAD, HAS_DENSE,
                               HAS_WINDOW)
            probs = tl.where(visible, probs, 0.0)
        d_probs = tl.dot(d_out, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, stream, offs_m[:, None], col_base + offs_n[None, :], cols_total, dropout_p)
            d_probs = tl.where(keep, d_probs * (1.0 / (1.0 - dropout_p)), 0.0)
        d_scores = probs * (d_probs - delta[:, None])
        if BIAS_GRAD:
            tl.store(dbias + offs_m[:, None] * stride_dbm + offs_n[None, :] * stride_dbn, d_scores,
                     mask=(offs_m[:, None] < q_len) & (offs_n[None, :] < k_len))
        if HAS_SOFTCAP:  # the bias is added after the cap: its gradient is the capped scores'
            d_scores = d_scores * (1.0 - capped * capped)
        dq += tl.dot(d_scores.to(q.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _query_grad_staged(dq, q, d_out, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                       lo, hi, full_lo, full_end, k_len, offs_m, offs_d, offs_dv, q_len, diag,
                       key_pad, stride_kpn, dense, stride_mm, stride_mn,
                       seed, stream, col_base, cols_total, dropout_p, qk_scale, cap_log2,
                       bias, stride_bm, stride_bn, dbias, stride_dbm, stride_dbn, window_left, window_right,
                       HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, PAD_DV: tl.constexpr,
                       BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """dQ over key blocks [lo, hi) of one source in the forward's stages: [full_lo, full_end) without bounds,
    causal or window masks, the rest with them."""
    whole_lo = tl.minimum(lo, hi)
    if HAS_WINDOW:
        whole_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    whole_hi = tl.maximum(tl.minimum(hi, full_end), whole_lo)
    dq = _accumulate_query_grad(dq, q, d_out, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                whole_lo, whole_hi, k_len, offs_m, offs_d, offs_dv, q_len, diag,
                                key_pad, stride_kpn, dense, stride_mm, stride_mn,
                                seed, stream, col_base, cols_total, dropout_p, qk_scale, cap_log2,
                                bias, stride_bm, stride_bn, dbias, stride_dbm, stride_dbn, window_left, window_right,
                                HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, HEAD_DIM_V=HEAD_DIM_V, PAD_DV=PAD_DV,
                                BLOCK_N=BLOCK_N, MASK_BOUNDS=False, CAUSAL=False,
                                HAS_KEY_PAD=HAS_KEY_PAD, HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT,
                                DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS, BIAS_GRAD=BIAS_GRAD,
                                HAS_SOFTCAP=HAS_SOFTCAP, HAS_WINDOW=False)
    # the masked edges, as in the forward: the window's leading one (with a window only), the trailing one
    for edge in tl.static_range(1 - HAS_WINDOW, 2):
        dq = _accumulate_query_grad(dq, q, d_out, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                                    lo if edge == 0 else whole_hi, whole_lo if edge == 0 else hi, k_len, offs_m,
                                    offs_d, offs_dv, q_len, diag, key_pad, stride_kpn, dense, stride_mm, stride_mn,
                                    seed, stream, col_base, cols_total, dropout_p, qk_scale, cap_log2,
                                    bias, stride_bm, stride_bn, dbias, stride_dbm, stride_dbn, window_left,
                                    window_right, HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, HEAD_DIM_V=HEAD_DIM_V,
                                    PAD_DV=PAD_DV, BLOCK_N=BLOCK_N, MASK_BOUNDS=True,
                                    CAUSAL=CAUSAL, HAS_KEY_PAD=HAS_KEY_PAD, HAS_DENSE=HAS_DENSE,
                                    HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS,
                                    BIAS_GRAD=BIAS_GRAD, HAS_SOFTCAP=HAS_SOFTCAP, HAS_WINDOW=HAS_WINDOW)
    return dq


@triton.jit
def _backward_query_kernel(
    Q, K, V, PK, PV, DOut, Lse, Delta, DQ, PrefixIndex, PrefixLengths, KeyPad, Dense, Bias, DBias, Seed, CuSeqQ,
    CuSeqK, PrefixBias, DPrefixBias,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd, stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod, stride_dqb, stride_dqh, stride_dqm,
    stride_kpb, stride_kpn, stride_mb, stride_mh, stride_mm, stride_mn, stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn, stride_pbb, stride_pbh, stride_pbm, stride_pbn,
    stride_dpbb, stride_dpbh, stride_dpbm, stride_dpbn,
    q_heads, q_len, k_len, num_prefixes, prefix_len, group, window_left, window_right, qk_scale, cap_log2, sm_scale,
    dropout_p, num_seqs, search_steps, total_q, total_k, q_len_class, k_len_class,  # the last two: autotuning keys
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    DV_PAD: tl.constexpr, PAD_DV: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_KEY_PAD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PREFIX_BIAS: tl.constexpr,
    PREFIX_BIAS_GRAD: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block of one head of one sample: the forward's two stages, replayed. With BIAS_GRAD it
    also writes the bias gradient of the sequence keys it visits (the caller zeroes the rest), with
    PREFIX_BIAS_GRAD the prefix bias's of the prefix keys it visits. VARLEN: packed sequences, programs numbered as
    in the forward."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cols_total = prefix_len + k_len
    q_start = b * 0
    k_start = b * 0
    if VARLEN:
        b, pid_m, q_start, q_len, k_start, k_len = _varlen_query_block(pid_m, CuSeqQ, CuSeqK, num_seqs,
                                                                       search_steps, total_q, total_k, BLOCK_M)
        if (pid_m < 0) | (pid_m * BLOCK_M >= q_len):
            return
    hkv = h // group
    entry, prefix_keys, index_ok = _bank_entry(PrefixIndex, PrefixLengths, b, num_prefixes, prefix_len,
                                               HAS_INDEX, HAS_LENGTHS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < q_len
    q = _load(Q + b * stride_qb + q_start * stride_qm + h * stride_qh + offs_m[:, None] * stride_qm
              + offs_d[None, :], row_ok[:, None], offs_d[None, :] < HEAD_DIM, True, PAD_D)
    d_out = _load(DOut + b * stride_dob + q_start * stride_dom + h * stride_doh + offs_m[:, None] * stride_dom
                  + offs_dv[None, :] * stride_dod, row_ok[:, None], offs_dv[None, :] < HEAD_DIM_V, True,
                  PAD_DV).to(q.dtype)
    rows = _row_base(b, h, q_heads, q_len, q_start, total_q, VARLEN) + offs_m
    lse = _lse_log2(Lse, rows, row_ok)
    delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    stream = (b * q_heads + h).to(tl.int32)
    key_pad = _operand_base(KeyPad, b, 0, stride_kpb, 0, HAS_KEY_PAD)
    dense = _operand_base(Dense, b, h, stride_mb, stride_mh, HAS_DENSE)
    bias = _operand_base(Bias, b, h, stride_bb, stride_bh, HAS_BIAS)
    dbias = _operand_base(DBias, b, h, stride_dbb, stride_dbh, BIAS_GRAD)
    prefix_bias = _operand_base(PrefixBias, b, h, stride_pbb, stride_pbh, HAS_PREFIX_BIAS)
    d_prefix_bias = _operand_base(DPrefixBias, b, h, stride_dpbb, stride_dpbh, PREFIX_BIAS_GRAD)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    PKb = PK + entry * stride_pkt + hkv * stride_pkh
    PVb = PV + entry * stride_pvt + hkv * stride_pvh
    dq = _query_grad_staged(dq, q, d_out, lse, delta, PKb, PVb, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                            0, prefix_keys, 0, prefix_keys // BLOCK_N * BLOCK_N, prefix_keys, offs_m, offs_d,
                            offs_dv, q_len, 0, key_pad, stride_kpn, dense, stride_mm, stride_mn, seed, stream, 0,
                            cols_total, dropout_p, qk_scale, cap_log2, prefix_bias, stride_pbm, stride_pbn,
                            d_prefix_bias, stride_dpbm, stride_dpbn, window_left, window_right,
                            HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, HEAD_DIM_V=HEAD_DIM_V, PAD_DV=PAD_DV,
                            BLOCK_N=BLOCK_N, CAUSAL=False, HAS_KEY_PAD=False,
                            HAS_DENSE=False, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION,
                            HAS_BIAS=HAS_PREFIX_BIAS, BIAS_GRAD=PREFIX_BIAS_GRAD, HAS_SOFTCAP=HAS_SOFTCAP,
                            HAS_WINDOW=False)
    Kb = K + b * stride_kb + k_start * stride_kn + hkv * stride_kh
    Vb = V + b * stride_vb + k_start * stride_vn + hkv * stride_vh
    diag = k_len - q_len
    seq_full, seq_end = _sequence_key_range(pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M, diag, k_len, BLOCK_N,
                                            CAUSAL)
    seq_start = 0
    window_full = 0
    if HAS_WINDOW:
        seq_start, window_full, seq_full, seq_end = _window_key_range(
            pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M, q_len, diag, k_len, window_left, window_right, BLOCK_N)
    dq = _query_grad_staged(dq, q, d_out, lse, delta, Kb, Vb, stride_kn, 1, stride_vn, 1,
                            seq_start, seq_end, window_full, seq_full, k_len, offs_m, offs_d, offs_dv, q_len, diag,
                            key_pad, stride_kpn, dense, stride_mm, stride_mn, seed, stream, prefix_len, cols_total,
                            dropout_p, qk_scale, cap_log2, bias, stride_bm, stride_bn, dbias, stride_dbm, stride_dbn,
                            window_left, window_right,
                            HEAD_DIM=HEAD_DIM, PAD_D=PAD_D, HEAD_DIM_V=HEAD_DIM_V, PAD_DV=PAD_DV,
                            BLOCK_N=BLOCK_N, CAUSAL=CAUSAL, HAS_KEY_PAD=HAS_KEY_PAD,
                            HAS_DENSE=HAS_DENSE, HAS_DROPOUT=HAS_DROPOUT, DOT_PRECISION=DOT_PRECISION,
                            HAS_BIAS=HAS_BIAS, BIAS_GRAD=BIAS_GRAD, HAS_SOFTCAP=HAS_SOFTCAP, HAS_WINDOW=HAS_WINDOW)
    tl.store(DQ + b * stride_dqb + q_start * stride_dqm + h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _prefix_grad_finalize_kernel(
    PartialK, PartialV, GradK, GradV, PrefixIndex,
    stride_gkt, stride_gkh, stride_gkn, stride_gkd, stride_gvt, stride_gvh, stride_gvn, stride_gvd,
    batch, kv_heads, prefix_len,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_INDEX: tl.constexpr, SUM_SAMPLES: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The prefix gradients in their own dtype: the float32 per-entry sums, or (deterministic) the per-sample
    partials summed over the samples that used the entry, in sample order."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    hkv = tl.program_id(1)
    t = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    mask = (offs_n[:, None] < prefix_len) & (offs_d[None, :] < HEAD_DIM)
    mask_v = (offs_n[:, None] < prefix_len) & (offs_dv[None, :] < HEAD_DIM_V)
    tile = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tile_v = offs_n[:, None] * HEAD_DIM_V + offs_dv[None, :]
    if SUM_SAMPLES:
        grad_k = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        grad_v = tl.zeros([BLOCK_N, DV_PAD], dtype=tl.float32)
        for s in range(0, batch):
            # A scalar branch, not a mask: Triton 3.9's interpreter turns `block mask & scalar comparison` into
            # an int32 mask, which tl.load then rejects ('mask has unsupported dtype').
            entry = t
            if HAS_INDEX:
                entry = tl.load(PrefixIndex + s).to(tl.int64)
            if entry == t:
                rows = (s * kv_heads + hkv) * prefix_len
                grad_k += tl.load(PartialK + rows * HEAD_DIM + tile, mask=mask, other=0.0)
                grad_v += tl.load(PartialV + rows * HEAD_DIM_V + tile_v, mask=mask_v, other=0.0)
    else:
        rows = (t * kv_heads + hkv) * prefix_len
        grad_k = tl.load(PartialK + rows * HEAD_DIM + tile, mask=mask, other=0.0)
        grad_v = tl.load(PartialV + rows * HEAD_DIM_V + tile_v, mask=mask_v, other=0.0)
    tl.store(GradK + t * stride_gkt + hkv * stride_gkh + offs_n[:, None] * stride_gkn + offs_d[None, :] * stride_gkd,
             grad_k.to(GradK.dtype.element_ty), mask=mask)
    tl.store(GradV + t * stride_gvt + hkv * stride_gvh + offs_n[:, None] * stride_gvn + offs_dv[None, :] * stride_gvd,
             grad_v.to(GradV.dtype.element_ty), mask=mask_v)


@triton.jit
def _dropout_mask_kernel(Keep, Seed, q_len, cols, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    stream = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(Seed), stream, rows[:, None], offs_c[None, :], cols, dropout_p)
    tl.store(Keep + (stream.to(tl.int64) * q_len + rows[:, None]) * cols + offs_c[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < q_len) & (offs_c[None, :] < cols))
