// Forward kernels: the tensor-core tiled kernel (float16/bfloat16) and the CUDA-core kernel (float32, any dtype).
//
// One block per (query block, query head, sample), the design of the Triton backend: one pass over the sample's
// prefix keys (its bank entry, read in place through strides), then over its sequence keys, with an online softmax
// in the exp2 domain. Only tiles that can be partly invisible pay for masks: the prefix's last partial tile and the
// sequence tiles at the causal diagonal, the ragged end, or under a key-padding/dense mask.
#include "attention_tile.cuh"
#include "launch.cuh"

namespace ptv2 {

// ---- tensor cores ---------------------------------------------------------------------------------------------
// 4 warps x 16 query rows. K and V tiles of kBN keys: the V tile loads while Q·K^T runs, the next K tile while
// P·V runs (cp.async groups), so one K and one V buffer suffice.
template <typename T, int kD>
__global__ void __launch_bounds__(128) forward_tiled_kernel(const PTV2_GRID_CONSTANT Params p) {
  constexpr int kBM = kTiledBlockM, kBN = tiled_block_n(kD), NT = kBN / 8, DT = kD / 8;
  PTV2_SHARED_MEMORY(smem);
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_k = s_q + kBM * kD;
  T* s_v = s_k + kBN * kD;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.x * kBM, h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int hkv = h / p.group;
  const BankEntry bank = bank_entry(p, b);
  const int hd = p.head_dim, d_steps = ceil_div(hd, 16), d_chunks = 2 * d_steps;

  const RowSource q_src{offset_ptr(p.q, b * p.q_sb + h * p.q_sh, p.dtype), p.q_sm, 1, p.dtype, p.q_vec};
  const RowSource pk_src{offset_ptr(p.pk, bank.entry * p.pk_st + hkv * p.pk_sh, p.prefix_dtype), p.pk_sn, p.pk_sd,
                         p.prefix_dtype, p.pk_vec};
  const RowSource pv_src{offset_ptr(p.pv, bank.entry * p.pv_st + hkv * p.pv_sh, p.prefix_dtype), p.pv_sn, p.pv_sd,
                         p.prefix_dtype, p.pv_vec};
  const RowSource k_src{offset_ptr(p.k, b * p.k_sb + hkv * p.k_sh, p.dtype), p.k_sn, 1, p.dtype, p.k_vec};
  const RowSource v_src{offset_ptr(p.v, b * p.v_sb + hkv * p.v_sh, p.dtype), p.v_sn, 1, p.dtype, p.v_vec};

  // Key tiles: the prefix's, then the sequence's up to the last key any row of this block sees.
  const int diag = p.k_len - p.q_len;
  int seq_end = p.k_len;
  if (p.causal) seq_end = min(max(m0 + kBM + diag, 0), p.k_len);
  const int n_prefix_tiles = ceil_div(bank.keys, kBN);
  const int n_tiles = n_prefix_tiles + ceil_div(seq_end, kBN);

  load_tile<T, kBM, kD>(s_q, q_src, m0, p.q_len, hd, d_chunks, tid, 128);
  if (n_tiles > 0) {
    if (n_prefix_tiles > 0) {
      load_tile<T, kBN, kD>(s_k, pk_src, 0, bank.keys, hd, d_chunks, tid, 128);
    } else {
      load_tile<T, kBN, kD>(s_k, k_src, 0, p.k_len, hd, d_chunks, tid, 128);
    }
  }
  cp_async_commit();

  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int row0 = m0 + warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
  const SeqMask mask = seq_mask(p, b, h);
  const uint64_t seed = load_seed(p);
  const uint32_t stream = static_cast<uint32_t>(b * p.q_heads + h);
  const uint32_t cols_total = static_cast<uint32_t>(p.prefix_len + p.k_len);

  for (int it = 0; it < n_tiles; ++it) {
    const bool is_prefix = it < n_prefix_tiles;
    const int n0 = (is_prefix ? it : it - n_prefix_tiles) * kBN;
    if (is_prefix) {
      load_tile<T, kBN, kD>(s_v, pv_src, n0, bank.keys, hd, d_chunks, tid, 128);
    } else {
      load_tile<T, kBN, kD>(s_v, v_src, n0, p.k_len, hd, d_chunks, tid, 128);
    }
    cp_async_commit();
    cp_async_wait<1>();  // Q and this K tile
    sync_block();

    float s[1][NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[0][nt][0] = s[0][nt][1] = s[0][nt][2] = s[0][nt][3] = 0.f;
    warp_mma<T, 1, NT, kD, false, kD, false>(s, s_q, warp * 16, 0, s_k, 0, 0, d_steps, NT / 2, lane);

    const bool need_mask = is_prefix ? (n0 + kBN > bank.keys) : seq_tile_needs_mask(p, m0, n0, kBN);
    const int prefix_keys = bank.keys;
    auto visible = [&](int half, int col) {
      return is_prefix ? (n0 + col < prefix_keys) : seq_visible(p, mask, row0 + 8 * half, n0 + col);
    };
    const uint32_t col_base = static_cast<uint32_t>(is_prefix ? n0 : p.prefix_len + n0);
    auto keep = [&](int half, int col) {
      return dropout_keep(seed, stream, static_cast<uint32_t>(row0 + 8 * half), col_base + col, cols_total,
                          p.dropout_p);
    };
    float alpha[2];
    online_softmax<NT>(s[0], row_max, row_sum, alpha, p.qk_scale_log2, need_mask, visible, p.has_dropout, keep,
                       lane);
    rescale_rows<DT>(o, alpha);

    cp_async_wait<0>();  // this V tile
    sync_block();        // ... and every warp is done with the K tile
    if (it + 1 < n_tiles) {
      const bool next_prefix = it + 1 < n_prefix_tiles;
      const int next_n0 = (next_prefix ? it + 1 : it + 1 - n_prefix_tiles) * kBN;
      if (next_prefix) {
        load_tile<T, kBN, kD>(s_k, pk_src, next_n0, bank.keys, hd, d_chunks, tid, 128);
      } else {
        load_tile<T, kBN, kD>(s_k, k_src, next_n0, p.k_len, hd, d_chunks, tid, 128);
      }
    }
    cp_async_commit();
    warp_mma_regs_a<T, NT, DT, kD>(o, s[0], s_v, 0, d_steps, lane);
    sync_block();  // every warp is done with the V tile
  }
  cp_async_wait<0>();

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float sum = quad_sum(row_sum[half]);
    const int row = row0 + 8 * half;
    if (row < p.q_len) {
      T* out_row = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + static_cast<int64_t>(row) * p.o_sm;
      store_output_row<T, DT>(out_row, o, half, sum, p.dropout_scale, bank.index_ok, hd, lane);
      if ((lane & 3) == 0) {
        p.lse[(b * p.q_heads + h) * p.q_len + row] =
            sum > 0.f ? (row_max[half] + log2f(sum)) * kLn2 : -INFINITY;
      }
    }
  }
}

// ---- CUDA cores ---------------------------------------------------------------------------------------------------
// float32 inputs (and any dtype: elements are converted on load). 128 threads, 16 query rows, tiles of 32 keys;
// head_dim is a runtime size. Scores, probabilities and the output accumulator live in shared memory.
__global__ void __launch_bounds__(128) forward_simple_kernel(const PTV2_GRID_CONSTANT Params p) {
  constexpr int BM = kSimpleFwdM, BN = kSimpleFwdN, kThreads = 128;
  const int D = p.head_dim;
  PTV2_SHARED_MEMORY(smem);
  float* s_q = reinterpret_cast<float*>(smem);
  float* s_o = s_q + BM * D;
  float* s_k = s_o + BM * D;
  float* s_v = s_k + BN * D;
  float* s_s = s_v + BN * D;
  float* s_max = s_s + BM * BN;
  float* s_sum = s_max + BM;
  float* s_alpha = s_sum + BM;

  const int tid = threadIdx.x;
  const int m0 = blockIdx.x * BM, h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int hkv = h / p.group;
  const BankEntry bank = bank_entry(p, b);
  const SeqMask mask = seq_mask(p, b, h);
  const uint64_t seed = load_seed(p);
  const uint32_t stream = static_cast<uint32_t>(b * p.q_heads + h);
  const uint32_t cols_total = static_cast<uint32_t>(p.prefix_len + p.k_len);

  const void* q_base = offset_ptr(p.q, b * p.q_sb + h * p.q_sh, p.dtype);
  for (int i = tid; i < BM * D; i += kThreads) {
    const int r = i / D, d = i % D, row = m0 + r;
    s_q[i] = row < p.q_len ? load_as_float(q_base, static_cast<int64_t>(row) * p.q_sm + d, p.dtype) : 0.f;
    s_o[i] = 0.f;
  }
  if (tid < BM) {
    s_max[tid] = -INFINITY;
    s_sum[tid] = 0.f;
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

    sync_block();  // the previous tile's P·V is done with s_k, s_v, s_s
    for (int i = tid; i < BN * D; i += kThreads) {
      const int c = i / D, d = i % D, key = n0 + c;
      const bool ok = key < len;
      s_k[i] = ok ? load_as_float(k_base, key * k_sn + d * k_sd, dtype) : 0.f;
      s_v[i] = ok ? load_as_float(v_base, key * v_sn + d * v_sd, dtype) : 0.f;
    }
    sync_block();
    for (int i = tid; i < BM * BN; i += kThreads) {
      const int r = i / BN, c = i % BN;
      float acc = 0.f;
      for (int d = 0; d < D; ++d) acc += s_q[r * D + d] * s_k[c * D + d];
      const bool vis = is_prefix ? (n0 + c < bank.keys) : seq_visible(p, mask, m0 + r, n0 + c);
      s_s[i] = vis ? acc * p.qk_scale_log2 : -INFINITY;
    }
    sync_block();
    if (tid < BM) {
      const int r = tid;
      float tile_max = -INFINITY;
      for (int c = 0; c < BN; ++c) tile_max = fmaxf(tile_max, s_s[r * BN + c]);
      const float m_new = fmaxf(s_max[r], tile_max);
      const float shift = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(s_max[r] - shift);
      const uint32_t col_base = static_cast<uint32_t>(is_prefix ? n0 : p.prefix_len + n0);
      float sum = 0.f;
      for (int c = 0; c < BN; ++c) {
        float prob = exp2f(s_s[r * BN + c] - shift);
        sum += prob;
        if (p.has_dropout &&
            !dropout_keep(seed, stream, static_cast<uint32_t>(m0 + r), col_base + c, cols_total, p.dropout_p)) {
          prob = 0.f;
        }
        s_s[r * BN + c] = prob;
      }
      s_sum[r] = s_sum[r] * alpha + sum;
      s_max[r] = m_new;
      s_alpha[r] = alpha;
    }
    sync_block();
    for (int i = tid; i < BM * D; i += kThreads) {
      const int r = i / D, d = i % D;
      float acc = s_o[i] * s_alpha[r];
      for (int c = 0; c < BN; ++c) acc += s_s[r * BN + c] * s_v[c * D + d];
      s_o[i] = acc;
    }
  }
  sync_block();

  for (int i = tid; i < BM * D; i += kThreads) {
    const int r = i / D, d = i % D, row = m0 + r;
    if (row >= p.q_len) continue;
    const float sum = s_sum[r];
    float value = s_o[i] / (sum > 0.f ? sum : 1.f) * p.dropout_scale;
    if (!bank.index_ok) value = NAN;
    store_from_float(p.out, b * p.o_sb + h * p.o_sh + static_cast<int64_t>(row) * p.o_sm + d, p.dtype, value);
  }
  if (tid < BM && m0 + tid < p.q_len) {
    const float sum = s_sum[tid];
    p.lse[(b * p.q_heads + h) * p.q_len + m0 + tid] = sum > 0.f ? (s_max[tid] + log2f(sum)) * kLn2 : -INFINITY;
  }
}

// ---- launcher -------------------------------------------------------------------------------------------------------

template <typename T, int kD>
static const char* launch_tiled(const Params& p, void* stream) {
  const dim3 grid(ceil_div(p.q_len, kTiledBlockM), p.q_heads, p.batch);
  return launch_kernel(forward_tiled_kernel<T, kD>, grid, dim3(128), forward_smem_bytes(kD), stream, p);
}

const char* launch_forward_tiled(const Params& p, void* stream) {
  if (is_16bit(p.dtype)) {
    return dispatch_16bit(p, [&](auto type, auto dim) {
      return launch_tiled<typename decltype(type)::type, decltype(dim)::value>(p, stream);
    });
  }
  const dim3 grid(ceil_div(p.q_len, kSimpleFwdM), p.q_heads, p.batch);
  return launch_kernel(forward_simple_kernel, grid, dim3(128), simple_forward_smem_bytes(p.head_dim), stream, p);
}

}  // namespace ptv2
