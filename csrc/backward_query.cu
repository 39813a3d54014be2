// Backward, part 1: Δ = rowsum(dO · O) − dlse, dQ, and the prefix gradients' final reduction and cast.
//
// The design of the Triton backend (FlashAttention-2 style): probabilities are recomputed from the forward's lse;
// dQ is computed per query block (this file), dK/dV per key block (backward_keys.cu). The prefix gradient of a
// bank entry is the sum over the samples that use it: the key kernel adds each sample's share into a float32
// buffer per entry with atomics, or, deterministic, stores it per sample, and prefix_grad_finalize_kernel sums the
// samples in order and writes the gradients in the prefix's dtype.
#include "attention_tile.cuh"
#include "launch.cuh"

namespace ptv2 {

// ---- Δ ------------------------------------------------------------------------------------------------------------
// One warp per query row.
__global__ void __launch_bounds__(128) backward_preprocess_kernel(const PTV2_GRID_CONSTANT Params p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  const int64_t rows_total = static_cast<int64_t>(p.batch) * p.q_heads * p.q_len;
  if (row >= rows_total) return;
  const int i = static_cast<int>(row % p.q_len);
  const int h = static_cast<int>((row / p.q_len) % p.q_heads);
  const int64_t b = row / p.q_len / p.q_heads;
  const int64_t out_base = b * p.o_sb + h * p.o_sh + static_cast<int64_t>(i) * p.o_sm;
  const int64_t do_base = b * p.do_sb + h * p.do_sh + static_cast<int64_t>(i) * p.do_sm;
  float acc = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) {
    acc += load_as_float(p.out, out_base + d, p.dtype) * load_as_float(p.dout, do_base + d * p.do_sd, p.dtype);
  }
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) acc += shfl_xor(acc, mask);
  if (lane == 0) {
    if (p.dlse != nullptr) acc -= p.dlse[b * p.dl_sb + h * p.dl_sh + static_cast<int64_t>(i) * p.dl_sm];
    p.delta[row] = acc;
  }
}

// lse in log2 units for recomputing probabilities: +inf where the row is out of range or saw nothing, so that its
// probabilities come out as exp2(-inf) = 0.
PTV2_DEVICE float lse_log2(const Params& p, int64_t b, int h, int row) {
  if (row >= p.q_len) return INFINITY;
  const float lse = p.lse[(b * p.q_heads + h) * p.q_len + row];
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

PTV2_DEVICE float delta_of(const Params& p, int64_t b, int h, int row) {
  return row < p.q_len ? p.delta[(b * p.q_heads + h) * p.q_len + row] : 0.f;
}

// ---- dQ on tensor cores ----------------------------------------------------------------------------------------------
// One block per (query block, query head, sample), 4 warps x 16 rows: the forward's two stages replayed. For each
// key tile: S = Q·K^T and dP = dO·V^T (both from shared memory), P = exp2(S·scale·log2e − lse), dS = P ∘ (dP − Δ)
// (dropout applied to dP), then dQ += dS·K with dS straight from registers.
template <typename T, int kD>
__global__ void __launch_bounds__(128) backward_query_tiled_kernel(const PTV2_GRID_CONSTANT Params p) {
  constexpr int kBM = kTiledBlockM, kBN = tiled_block_n(kD), NT = kBN / 8, DT = kD / 8;
  PTV2_SHARED_MEMORY(smem);
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_do = s_q + kBM * kD;
  T* s_k = s_do + kBM * kD;
  T* s_v = s_k + kBN * kD;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.x * kBM, h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int hkv = h / p.group;
  const BankEntry bank = bank_entry(p, b);
  const int hd = p.head_dim, d_steps = ceil_div(hd, 16), d_chunks = 2 * d_steps;

  const RowSource q_src{offset_ptr(p.q, b * p.q_sb + h * p.q_sh, p.dtype), p.q_sm, 1, p.dtype, p.q_vec};
  const RowSource do_src{offset_ptr(p.dout, b * p.do_sb + h * p.do_sh, p.dtype), p.do_sm, p.do_sd, p.dtype, p.do_vec};
  const RowSource pk_src{offset_ptr(p.pk, bank.entry * p.pk_st + hkv * p.pk_sh, p.prefix_dtype), p.pk_sn, p.pk_sd,
                         p.prefix_dtype, p.pk_vec};
  const RowSource pv_src{offset_ptr(p.pv, bank.entry * p.pv_st + hkv * p.pv_sh, p.prefix_dtype), p.pv_sn, p.pv_sd,
                         p.prefix_dtype, p.pv_vec};
  const RowSource k_src{offset_ptr(p.k, b * p.k_sb + hkv * p.k_sh, p.dtype), p.k_sn, 1, p.dtype, p.k_vec};
  const RowSource v_src{offset_ptr(p.v, b * p.v_sb + hkv * p.v_sh, p.dtype), p.v_sn, 1, p.dtype, p.v_vec};

  load_tile<T, kBM, kD>(s_q, q_src, m0, p.q_len, hd, d_chunks, tid, 128);
  load_tile<T, kBM, kD>(s_do, do_src, m0, p.q_len, hd, d_chunks, tid, 128);
  cp_async_commit();

  const int row0 = m0 + warp * 16 + lane / 4;
  float lse2[2], delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    lse2[half] = lse_log2(p, b, h, row0 + 8 * half);
    delta[half] = delta_of(p, b, h, row0 + 8 * half);
  }
  const SeqMask mask = seq_mask(p, b, h);
  const uint64_t seed = load_seed(p);
  const uint32_t stream = static_cast<uint32_t>(b * p.q_heads + h);
  const uint32_t cols_total = static_cast<uint32_t>(p.prefix_len + p.k_len);
  const int t = lane & 3;

  const int diag = p.k_len - p.q_len;
  int seq_end = p.k_len;
  if (p.causal) seq_end = min(max(m0 + kBM + diag, 0), p.k_len);
  const int n_prefix_tiles = ceil_div(bank.keys, kBN);
  const int n_tiles = n_prefix_tiles + ceil_div(seq_end, kBN);

  float dq[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;

  for (int it = 0; it < n_tiles; ++it) {
    const bool is_prefix = it < n_prefix_tiles;
    const int n0 = (is_prefix ? it : it - n_prefix_tiles) * kBN;
    if (is_prefix) {
      load_tile<T, kBN, kD>(s_k, pk_src, n0, bank.keys, hd, d_chunks, tid, 128);
      load_tile<T, kBN, kD>(s_v, pv_src, n0, bank.keys, hd, d_chunks, tid, 128);
    } else {
      load_tile<T, kBN, kD>(s_k, k_src, n0, p.k_len, hd, d_chunks, tid, 128);
      load_tile<T, kBN, kD>(s_v, v_src, n0, p.k_len, hd, d_chunks, tid, 128);
    }
    cp_async_commit();
    cp_async_wait<0>();
    sync_block();

    float s[1][NT][4], dp[1][NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][nt][e] = dp[0][nt][e] = 0.f;
    }
    warp_mma<T, 1, NT, kD, false, kD, false>(s, s_q, warp * 16, 0, s_k, 0, 0, d_steps, NT / 2, lane);
    warp_mma<T, 1, NT, kD, false, kD, false>(dp, s_do, warp * 16, 0, s_v, 0, 0, d_steps, NT / 2, lane);

    const bool need_mask = is_prefix ? (n0 + kBN > bank.keys) : seq_tile_needs_mask(p, m0, n0, kBN);
    const uint32_t col_base = static_cast<uint32_t>(is_prefix ? n0 : p.prefix_len + n0);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e >> 1, col = nt * 8 + 2 * t + (e & 1), row = row0 + 8 * half;
        float prob = exp2f(s[0][nt][e] * p.qk_scale_log2 - lse2[half]);
        if (need_mask) {
          const bool vis = is_prefix ? (n0 + col < bank.keys) : seq_visible(p, mask, row, n0 + col);
          if (!vis) prob = 0.f;
        }
        float d_prob = dp[0][nt][e];
        if (p.has_dropout) {
          const bool kept = dropout_keep(seed, stream, static_cast<uint32_t>(row), col_base + col, cols_total,
                                         p.dropout_p);
          d_prob = kept ? d_prob * p.dropout_scale : 0.f;
        }
        s[0][nt][e] = prob * (d_prob - delta[half]);  // dS
      }
    }
    warp_mma_regs_a<T, NT, DT, kD>(dq, s[0], s_k, 0, d_steps, lane);
    sync_block();  // every warp is done with the K/V tiles
  }
  cp_async_wait<0>();

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + 8 * half;
    if (row >= p.q_len) continue;
    T* dq_row = static_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh + static_cast<int64_t>(row) * p.dq_sm;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int col = dt * 8 + 2 * t;
      if (col < hd) dq_row[col * p.dq_sd] = from_float<T>(dq[dt][2 * half] * p.sm_scale);
      if (col + 1 < hd) dq_row[(col + 1) * p.dq_sd] = from_float<T>(dq[dt][2 * half + 1] * p.sm_scale);
    }
  }
}

// ---- dQ on CUDA cores (float32, any dtype) -----------------------------------------------------------------------------
__global__ void __launch_bounds__(128) backward_query_simple_kernel(const PTV2_GRID_CONSTANT Params p) {
  constexpr int BM = kSimpleQueryM, BN = kSimpleQueryN, kThreads = 128;
  const int D = p.head_dim;
  PTV2_SHARED_MEMORY(smem);
  float* s_q = reinterpret_cast<float*>(smem);
  float* s_do = s_q + BM * D;
  float* s_dq = s_do + BM * D;
  float* s_k = s_dq + BM * D;
  float* s_v = s_k + BN * D;
  float* s_ds = s_v + BN * D;
  float* s_lse = s_ds + BM * BN;
  float* s_delta = s_lse + BM;

  const int tid = threadIdx.x;
  const int m0 = blockIdx.x * BM, h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int hkv = h / p.group;
  const BankEntry bank = bank_entry(p, b);
  const SeqMask mask = seq_mask(p, b, h);
  const uint64_t seed = load_seed(p);
  const uint32_t stream = static_cast<uint32_t>(b * p.q_heads + h);
  const uint32_t cols_total = static_cast<uint32_t>(p.prefix_len + p.k_len);

  for (int i = tid; i < BM * D; i += kThreads) {
    const int r = i / D, d = i % D, row = m0 + r;
    const bool ok = row < p.q_len;
    s_q[i] = ok ? load_as_float(p.q, b * p.q_sb + h * p.q_sh + static_cast<int64_t>(row) * p.q_sm + d, p.dtype) : 0.f;
    s_do[i] = ok ? load_as_float(p.dout, b * p.do_sb + h * p.do_sh + static_cast<int64_t>(row) * p.do_sm + d * p.do_sd,
                                 p.dtype)
                 : 0.f;
    s_dq[i] = 0.f;
  }
  if (tid < BM) {
    s_lse[tid] = lse_log2(p, b, h, m0 + tid);
    s_delta[tid] = delta_of(p, b, h, m0 + tid);
  }

  const int diag = p.k_len - p.q_len;
  int seq_end = p.k_len;
  if (p.causal) seq_end = min(max(m0 + BM + diag, 0), p.k_len);
  const int n_prefix_tiles = ceil_div(bank.keys, BN);
  const int n_tiles = n_prefix_tiles + ceil_div(seq_end, BN);

  for (int it = 0; it < n_tiles; ++it) {
    const bool is_prefix = it < n_prefix_tiles;
    const int n0 = (is_prefix ? it : it - n_prefix_tiles) * BN;
    const int len = is_prefix ? bank.keys : p.k_len;
    const void* k_base = is_prefix ? offset_ptr(p.pk, bank.entry * p.pk_st + hkv * p.pk_sh, p.prefix_dtype)
                                   : offset_ptr(p.k, b * p.k_sb + hkv * p.k_sh, p.dtype);
    const void* v_base = is_prefix ? offset_ptr(p.pv, bank.entry * p.pv_st + hkv * p.pv_sh, p.prefix_dtype)
                                   : offset_ptr(p.v, b * p.v_sb + hkv * p.v_sh, p.dtype);
    const int64_t k_sn = is_prefix ? p.pk_sn : p.k_sn, k_sd = is_prefix ? p.pk_sd : 1;
    const int64_t v_sn = is_prefix ? p.pv_sn : p.v_sn, v_sd = is_prefix ? p.pv_sd : 1;
    const int dtype = is_prefix ? p.prefix_dtype : p.dtype;

    sync_block();
    for (int i = tid; i < BN * D; i += kThreads) {
      const int c = i / D, d = i % D, key = n0 + c;
      const bool ok = key < len;
      s_k[i] = ok ? load_as_float(k_base, key * k_sn + d * k_sd, dtype) : 0.f;
      s_v[i] = ok ? load_as_float(v_base, key * v_sn + d * v_sd, dtype) : 0.f;
    }
    sync_block();
    const uint32_t col_base = static_cast<uint32_t>(is_prefix ? n0 : p.prefix_len + n0);
    for (int i = tid; i < BM * BN; i += kThreads) {
      const int r = i / BN, c = i % BN, row = m0 + r;
      float score = 0.f, d_prob = 0.f;
      for (int d = 0; d < D; ++d) {
        score += s_q[r * D + d] * s_k[c * D + d];
        d_prob += s_do[r * D + d] * s_v[c * D + d];
      }
      const bool vis = is_prefix ? (n0 + c < bank.keys) : seq_visible(p, mask, row, n0 + c);
      const float prob = vis ? exp2f(score * p.qk_scale_log2 - s_lse[r]) : 0.f;
      if (p.has_dropout) {
        const bool kept = dropout_keep(seed, stream, static_cast<uint32_t>(row), col_base + c, cols_total, p.dropout_p);
        d_prob = kept ? d_prob * p.dropout_scale : 0.f;
      }
      s_ds[i] = prob * (d_prob - s_delta[r]);
    }
    sync_block();
    for (int i = tid; i < BM * D; i += kThreads) {
      const int r = i / D, d = i % D;
      float acc = s_dq[i];
      for (int c = 0; c < BN; ++c) acc += s_ds[r * BN + c] * s_k[c * D + d];
      s_dq[i] = acc;
    }
  }
  sync_block();
  for (int i = tid; i < BM * D; i += kThreads) {
    const int r = i / D, d = i % D, row = m0 + r;
    if (row >= p.q_len) continue;
    store_from_float(p.dq, b * p.dq_sb + h * p.dq_sh + static_cast<int64_t>(row) * p.dq_sm + d * p.dq_sd, p.dtype,
                     s_dq[i] * p.sm_scale);
  }
}

// ---- prefix gradients -------------------------------------------------------------------------------------------------
// One thread per element of the bank's gradient: the entry's float32 sum (atomics), or (deterministic) the
// per-sample partials of the samples that used the entry, summed in sample order. Written in the prefix's dtype.
__global__ void __launch_bounds__(256) prefix_grad_finalize_kernel(const PTV2_GRID_CONSTANT Params p) {
  const int64_t n = static_cast<int64_t>(p.num_prefixes) * p.kv_heads * p.prefix_len * p.head_dim;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= n) return;
  const int d = static_cast<int>(index % p.head_dim);
  const int key = static_cast<int>((index / p.head_dim) % p.prefix_len);
  const int hkv = static_cast<int>((index / p.head_dim / p.prefix_len) % p.kv_heads);
  const int64_t entry = index / p.head_dim / p.prefix_len / p.kv_heads;
  const int64_t inner = (static_cast<int64_t>(hkv) * p.prefix_len + key) * p.head_dim + d;
  const int64_t slot_stride = static_cast<int64_t>(p.kv_heads) * p.prefix_len * p.head_dim;
  float grad_k = 0.f, grad_v = 0.f;
  if (p.deterministic) {
    for (int64_t s = 0; s < p.batch; ++s) {
      int64_t used = 0;
      if (p.prefix_index != nullptr) {
        used = p.index_64 ? static_cast<const int64_t*>(p.prefix_index)[s]
                          : static_cast<int64_t>(static_cast<const int32_t*>(p.prefix_index)[s]);
      }
      if (used != entry) continue;
      grad_k += p.part_dk[s * slot_stride + inner];
      grad_v += p.part_dv[s * slot_stride + inner];
    }
  } else {
    grad_k = p.part_dk[entry * slot_stride + inner];
    grad_v = p.part_dv[entry * slot_stride + inner];
  }
  store_from_float(p.dpk, entry * p.dpk_st + hkv * p.dpk_sh + static_cast<int64_t>(key) * p.dpk_sn + d * p.dpk_sd,
                   p.prefix_dtype, grad_k);
  store_from_float(p.dpv, entry * p.dpv_st + hkv * p.dpv_sh + static_cast<int64_t>(key) * p.dpv_sn + d * p.dpv_sd,
                   p.prefix_dtype, grad_v);
}

// ---- launchers -------------------------------------------------------------------------------------------------------

const char* launch_backward_preprocess(const Params& p, void* stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_heads * p.q_len;
  return launch_kernel(backward_preprocess_kernel, dim3(static_cast<unsigned>((rows + 3) / 4)), dim3(128), 0, stream,
                       p);
}

template <typename T, int kD>
static const char* launch_query_tiled(const Params& p, void* stream) {
  const dim3 grid(ceil_div(p.q_len, kTiledBlockM), p.q_heads, p.batch);
  return launch_kernel(backward_query_tiled_kernel<T, kD>, grid, dim3(128), dq_smem_bytes(kD), stream, p);
}

const char* launch_backward_query_grads(const Params& p, void* stream) {
  if (is_16bit(p.dtype)) {
    return dispatch_16bit(p, [&](auto type, auto dim) {
      return launch_query_tiled<typename decltype(type)::type, decltype(dim)::value>(p, stream);
    });
  }
  const dim3 grid(ceil_div(p.q_len, kSimpleQueryM), p.q_heads, p.batch);
  return launch_kernel(backward_query_simple_kernel, grid, dim3(128), simple_query_grad_smem_bytes(p.head_dim), stream,
                       p);
}

const char* launch_prefix_grad_finalize(const Params& p, void* stream) {
  const int64_t n = static_cast<int64_t>(p.num_prefixes) * p.kv_heads * p.prefix_len * p.head_dim;
  return launch_kernel(prefix_grad_finalize_kernel, dim3(static_cast<unsigned>((n + 255) / 256)), dim3(256), 0,
                       stream, p);
}

}  // namespace ptv2
