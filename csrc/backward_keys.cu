// Backward, part 2: dK and dV per key block, prefix key blocks first, then sequence key blocks.
//
// One block per (key block, kv head, sample). The query heads of a GQA group are summed in the block. A prefix
// key block's result is one sample's share of its bank entry's gradient: added with float32 atomics into the
// entry's slot, or, deterministic, stored into the sample's slot (summed in order by prefix_grad_finalize_kernel).
// For each block of queries: S^T = K·Q^T and dP^T = V·dO^T, P^T = exp2(S^T·scale·log2e − lse), dS^T =
// P^T ∘ (dP^T − Δ) (dropout applied to dP^T and to the P^T that multiplies dO), both written to shared memory as T,
// then dV += P^T·dO and dK += dS^T·Q.
#include "attention_tile.cuh"
#include "launch.cuh"

namespace ptv2 {

PTV2_DEVICE float lse_log2_at(const Params& p, int64_t b, int h, int row) {
  if (row >= p.q_len) return INFINITY;
  const float lse = p.lse[(b * p.q_heads + h) * p.q_len + row];
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// Store a warp's [16 x kD/WC] accumulator tile (rows key_row0.., columns col0..) of dK or dV.
template <int GNT, class Store>
PTV2_DEVICE void store_key_tile(const float (&acc)[1][GNT][4], int key_row0, int col0, int lane, Store store) {
  const int t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < GNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) store(key_row0 + lane / 4 + 8 * (e >> 1), col0 + nt * 8 + 2 * t + (e & 1), acc[0][nt][e]);
  }
}

// ---- tensor cores ------------------------------------------------------------------------------------------------
// kWarps warps as a 4 x (kWarps / 4) grid: 4 warps of 16 keys along the key block; along the query block for the
// score tiles, along the head dim for the gradient tiles.
template <typename T, int kD>
__global__ void __launch_bounds__(key_grad_warps(kD) * 32) backward_key_tiled_kernel(const PTV2_GRID_CONSTANT Params p) {
  constexpr int kWarps = key_grad_warps(kD), kThreads = kWarps * 32;
  constexpr int kBN = kKeyGradBlockN, kBM = kKeyGradBlockM;
  constexpr int WC = kWarps / 4;
  constexpr int SNT = kBM / (8 * WC);  // n8 tiles of a warp's score tile (queries)
  constexpr int GNT = kD / (8 * WC);   // n8 tiles of a warp's gradient tile (head dim)
  static_assert(kBN == 16 * 4, "4 warps of 16 keys");
  PTV2_SHARED_MEMORY(smem);
  T* s_k = reinterpret_cast<T*>(smem);
  T* s_v = s_k + kBN * kD;
  T* s_q = s_v + kBN * kD;
  T* s_do = s_q + kBM * kD;
  T* s_p = s_do + kBM * kD;  // [kBN][kBM]: P^T after dropout
  T* s_ds = s_p + kBN * kBM;  // [kBN][kBM]: dS^T
  float* s_lse = reinterpret_cast<float*>(s_ds + kBN * kBM);
  float* s_delta = s_lse + kBM;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wr = warp % 4, wc = warp / 4;
  const int pid = blockIdx.x, hkv = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int hd = p.head_dim, d_steps = ceil_div(hd, 16), d_chunks = 2 * d_steps;
  const int prefix_blocks = ceil_div(p.prefix_len, kBN);
  const bool is_prefix = pid < prefix_blocks;

  BankEntry bank{0, 0, true};
  int n0, len;
  RowSource k_src, v_src;
  if (is_prefix) {
    bank = bank_entry(p, b);
    n0 = pid * kBN;
    len = bank.keys;
    if (n0 >= len) return;  // keys this sample does not see: no gradient share (its slot stays 0)
    k_src = RowSource{offset_ptr(p.pk, bank.entry * p.pk_st + hkv * p.pk_sh, p.prefix_dtype), p.pk_sn, p.pk_sd,
                      p.prefix_dtype, p.pk_vec};
    v_src = RowSource{offset_ptr(p.pv, bank.entry * p.pv_st + hkv * p.pv_sh, p.prefix_dtype), p.pv_sn, p.pv_sd,
                      p.prefix_dtype, p.pv_vec};
  } else {
    n0 = (pid - prefix_blocks) * kBN;
    len = p.k_len;
    k_src = RowSource{offset_ptr(p.k, b * p.k_sb + hkv * p.k_sh, p.dtype), p.k_sn, 1, p.dtype, p.k_vec};
    v_src = RowSource{offset_ptr(p.v, b * p.v_sb + hkv * p.v_sh, p.dtype), p.v_sn, 1, p.dtype, p.v_vec};
  }
  load_tile<T, kBN, kD>(s_k, k_src, n0, len, hd, d_chunks, tid, kThreads);
  load_tile<T, kBN, kD>(s_v, v_src, n0, len, hd, d_chunks, tid, kThreads);
  cp_async_commit();

  float dk[1][GNT][4], dv[1][GNT][4];
#pragma unroll
  for (int nt = 0; nt < GNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[0][nt][e] = dv[0][nt][e] = 0.f;
  }
  // Pairs of n8 gradient columns this warp computes: those below the head dim.
  const int g_col0 = wc * (kD / WC);
  const int g_pairs = min(GNT / 2, max(0, ceil_div(hd - g_col0, 16)));

  // Causal: queries before first_row see none of these keys.
  const int diag = p.k_len - p.q_len;
  int first_row = 0;
  if (!is_prefix && p.causal) first_row = max(n0 - diag, 0) / kBM * kBM;
  const bool masked = !is_prefix && (p.causal || p.key_pad != nullptr || p.dense != nullptr);
  const uint64_t seed = load_seed(p);
  const uint32_t cols_total = static_cast<uint32_t>(p.prefix_len + p.k_len);
  const uint32_t col_base = static_cast<uint32_t>(is_prefix ? 0 : p.prefix_len);
  const int t = lane & 3;
  const int key_row = wr * 16 + lane / 4;  // this thread's keys: key_row, key_row + 8 (in the block)
  const int q_col0 = wc * (kBM / WC);      // this warp's queries in the query block

  for (int g = 0; g < p.group; ++g) {
    const int h = hkv * p.group + g;
    const RowSource q_src{offset_ptr(p.q, b * p.q_sb + h * p.q_sh, p.dtype), p.q_sm, 1, p.dtype, p.q_vec};
    const RowSource do_src{offset_ptr(p.dout, b * p.do_sb + h * p.do_sh, p.dtype), p.do_sm, p.do_sd, p.dtype,
                           p.do_vec};
    const SeqMask mask = seq_mask(p, b, h);
    const uint32_t stream = static_cast<uint32_t>(b * p.q_heads + h);
    for (int m0 = first_row; m0 < p.q_len; m0 += kBM) {
      load_tile<T, kBM, kD>(s_q, q_src, m0, p.q_len, hd, d_chunks, tid, kThreads);
      load_tile<T, kBM, kD>(s_do, do_src, m0, p.q_len, hd, d_chunks, tid, kThreads);
      cp_async_commit();
      for (int i = tid; i < kBM; i += kThreads) {
        s_lse[i] = lse_log2_at(p, b, h, m0 + i);
        s_delta[i] = m0 + i < p.q_len ? p.delta[(b * p.q_heads + h) * p.q_len + m0 + i] : 0.f;
      }
      cp_async_wait<0>();
      sync_block();

      float st[1][SNT][4], dpt[1][SNT][4];
#pragma unroll
      for (int nt = 0; nt < SNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) st[0][nt][e] = dpt[0][nt][e] = 0.f;
      }
      warp_mma<T, 1, SNT, kD, false, kD, false>(st, s_k, wr * 16, 0, s_q, q_col0, 0, d_steps, SNT / 2, lane);
      warp_mma<T, 1, SNT, kD, false, kD, false>(dpt, s_v, wr * 16, 0, s_do, q_col0, 0, d_steps, SNT / 2, lane);

#pragma unroll
      for (int nt = 0; nt < SNT; ++nt) {
        float p_kept[4], ds[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key_local = key_row + 8 * (e >> 1);
          const int q_local = q_col0 + nt * 8 + 2 * t + (e & 1);
          const int key = n0 + key_local, row = m0 + q_local;
          float prob = exp2f(st[0][nt][e] * p.qk_scale_log2 - s_lse[q_local]);
          if (masked && !seq_visible(p, mask, row, key)) prob = 0.f;
          float d_prob = dpt[0][nt][e];
          float kept_prob = prob;
          if (p.has_dropout) {
            const bool kept = dropout_keep(seed, stream, static_cast<uint32_t>(row), col_base + key, cols_total,
                                           p.dropout_p);
            kept_prob = kept ? prob * p.dropout_scale : 0.f;
            d_prob = kept ? d_prob * p.dropout_scale : 0.f;
          }
          p_kept[e] = kept_prob;
          ds[e] = prob * (d_prob - s_delta[q_local]);
        }
        const int col = q_col0 + nt * 8 + 2 * t;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = key_row + 8 * half;
          *reinterpret_cast<uint32_t*>(s_p + swizzle_element<kBM>(r, col)) =
              pack2<T>(p_kept[2 * half], p_kept[2 * half + 1]);
          *reinterpret_cast<uint32_t*>(s_ds + swizzle_element<kBM>(r, col)) = pack2<T>(ds[2 * half], ds[2 * half + 1]);
        }
      }
      sync_block();
      // dV += P^T·dO, dK += dS^T·Q: A = [key][query] tiles, B = [query][d] tiles (transposed loads).
      warp_mma<T, 1, GNT, kBM, false, kD, true>(dv, s_p, wr * 16, 0, s_do, g_col0, 0, kBM / 16, g_pairs, lane);
      warp_mma<T, 1, GNT, kBM, false, kD, true>(dk, s_ds, wr * 16, 0, s_q, g_col0, 0, kBM / 16, g_pairs, lane);
      sync_block();  // before the next query block overwrites the tiles
    }
  }
  cp_async_wait<0>();

  if (is_prefix) {
    const int64_t slot = p.deterministic ? b : bank.entry;
    float* part_k = p.part_dk + (slot * p.kv_heads + hkv) * p.prefix_len * hd;
    float* part_v = p.part_dv + (slot * p.kv_heads + hkv) * p.prefix_len * hd;
    const bool deterministic = p.deterministic;
    const float sm_scale = p.sm_scale;
    store_key_tile<GNT>(dk, wr * 16, g_col0, lane, [&](int r, int c, float x) {
      if (n0 + r < len && c < hd) {
        float* dst = part_k + static_cast<int64_t>(n0 + r) * hd + c;
        if (deterministic) *dst = x * sm_scale; else atomic_add_f32(dst, x * sm_scale);
      }
    });
    store_key_tile<GNT>(dv, wr * 16, g_col0, lane, [&](int r, int c, float x) {
      if (n0 + r < len && c < hd) {
        float* dst = part_v + static_cast<int64_t>(n0 + r) * hd + c;
        if (deterministic) *dst = x; else atomic_add_f32(dst, x);
      }
    });
  } else {
    T* dk_base = static_cast<T*>(p.dk) + b * p.dk_sb + hkv * p.dk_sh;
    T* dv_base = static_cast<T*>(p.dv) + b * p.dv_sb + hkv * p.dv_sh;
    const float sm_scale = p.sm_scale;
    store_key_tile<GNT>(dk, wr * 16, g_col0, lane, [&](int r, int c, float x) {
      if (n0 + r < len && c < hd) dk_base[static_cast<int64_t>(n0 + r) * p.dk_sn + c * p.dk_sd] = from_float<T>(x * sm_scale);
    });
    store_key_tile<GNT>(dv, wr * 16, g_col0, lane, [&](int r, int c, float x) {
      if (n0 + r < len && c < hd) dv_base[static_cast<int64_t>(n0 + r) * p.dv_sn + c * p.dv_sd] = from_float<T>(x);
    });
  }
}

// ---- CUDA cores (float32, any dtype) -----------------------------------------------------------------------------------
// 128 threads; 16 keys per block, queries 16 at a time; scores and gradients in shared memory.
__global__ void __launch_bounds__(128) backward_key_simple_kernel(const PTV2_GRID_CONSTANT Params p) {
  constexpr int BN = kSimpleKeyN, BM = kSimpleKeyM, kThreads = 128;
  const int D = p.head_dim;
  PTV2_SHARED_MEMORY(smem);
  float* s_k = reinterpret_cast<float*>(smem);
  float* s_v = s_k + BN * D;
  float* s_dk = s_v + BN * D;
  float* s_dv = s_dk + BN * D;
  float* s_q = s_dv + BN * D;
  float* s_do = s_q + BM * D;
  float* s_p = s_do + BM * D;
  float* s_ds = s_p + BN * BM;
  float* s_lse = s_ds + BN * BM;
  float* s_delta = s_lse + BM;

  const int tid = threadIdx.x;
  const int pid = blockIdx.x, hkv = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int prefix_blocks = ceil_div(p.prefix_len, BN);
  const bool is_prefix = pid < prefix_blocks;
  BankEntry bank{0, 0, true};
  int n0, len;
  const void* k_base;
  const void* v_base;
  int64_t k_sn, k_sd, v_sn, v_sd;
  int dtype;
  if (is_prefix) {
    bank = bank_entry(p, b);
    n0 = pid * BN;
    len = bank.keys;
    if (n0 >= len) return;
    k_base = offset_ptr(p.pk, bank.entry * p.pk_st + hkv * p.pk_sh, p.prefix_dtype);
    v_base = offset_ptr(p.pv, bank.entry * p.pv_st + hkv * p.pv_sh, p.prefix_dtype);
    k_sn = p.pk_sn, k_sd = p.pk_sd, v_sn = p.pv_sn, v_sd = p.pv_sd;
    dtype = p.prefix_dtype;
  } else {
    n0 = (pid - prefix_blocks) * BN;
    len = p.k_len;
    k_base = offset_ptr(p.k, b * p.k_sb + hkv * p.k_sh, p.dtype);
    v_base = offset_ptr(p.v, b * p.v_sb + hkv * p.v_sh, p.dtype);
    k_sn = p.k_sn, k_sd = 1, v_sn = p.v_sn, v_sd = 1;
    dtype = p.dtype;
  }
  for (int i = tid; i < BN * D; i += kThreads) {
    const int c = i / D, d = i % D, key = n0 + c;
    const bool ok = key < len;
    s_k[i] = ok ? load_as_float(k_base, key * k_sn + d * k_sd, dtype) : 0.f;
    s_v[i] = ok ? load_as_float(v_base, key * v_sn + d * v_sd, dtype) : 0.f;
    s_dk[i] = 0.f;
    s_dv[i] = 0.f;
  }
  const int diag = p.k_len - p.q_len;
  int first_row = 0;
  if (!is_prefix && p.causal) first_row = max(n0 - diag, 0) / BM * BM;
  const bool masked = !is_prefix && (p.causal || p.key_pad != nullptr || p.dense != nullptr);
  const uint64_t seed = load_seed(p);
  const uint32_t cols_total = static_cast<uint32_t>(p.prefix_len + p.k_len);
  const uint32_t col_base = static_cast<uint32_t>(is_prefix ? 0 : p.prefix_len);

  for (int g = 0; g < p.group; ++g) {
    const int h = hkv * p.group + g;
    const SeqMask mask = seq_mask(p, b, h);
    const uint32_t stream = static_cast<uint32_t>(b * p.q_heads + h);
    for (int m0 = first_row; m0 < p.q_len; m0 += BM) {
      sync_block();  // the previous step is done with s_q, s_do, s_p, s_ds
      for (int i = tid; i < BM * D; i += kThreads) {
        const int r = i / D, d = i % D, row = m0 + r;
        const bool ok = row < p.q_len;
        s_q[i] = ok ? load_as_float(p.q, b * p.q_sb + h * p.q_sh + static_cast<int64_t>(row) * p.q_sm + d, p.dtype)
                    : 0.f;
        s_do[i] = ok ? load_as_float(p.dout,
                                     b * p.do_sb + h * p.do_sh + static_cast<int64_t>(row) * p.do_sm + d * p.do_sd,
                                     p.dtype)
                     : 0.f;
      }
      if (tid < BM) {
        s_lse[tid] = lse_log2_at(p, b, h, m0 + tid);
        s_delta[tid] = m0 + tid < p.q_len ? p.delta[(b * p.q_heads + h) * p.q_len + m0 + tid] : 0.f;
      }
      sync_block();
      for (int i = tid; i < BN * BM; i += kThreads) {
        const int c = i / BM, r = i % BM, key = n0 + c, row = m0 + r;
        float score = 0.f, d_prob = 0.f;
        for (int d = 0; d < D; ++d) {
          score += s_k[c * D + d] * s_q[r * D + d];
          d_prob += s_v[c * D + d] * s_do[r * D + d];
        }
        float prob = exp2f(score * p.qk_scale_log2 - s_lse[r]);
        if (masked && !seq_visible(p, mask, row, key)) prob = 0.f;
        float kept_prob = prob;
        if (p.has_dropout) {
          const bool kept = dropout_keep(seed, stream, static_cast<uint32_t>(row), col_base + key, cols_total,
                                         p.dropout_p);
          kept_prob = kept ? prob * p.dropout_scale : 0.f;
          d_prob = kept ? d_prob * p.dropout_scale : 0.f;
        }
        s_p[i] = kept_prob;
        s_ds[i] = prob * (d_prob - s_delta[r]);
      }
      sync_block();
      for (int i = tid; i < BN * D; i += kThreads) {
        const int c = i / D, d = i % D;
        float acc_k = s_dk[i], acc_v = s_dv[i];
        for (int r = 0; r < BM; ++r) {
          acc_v += s_p[c * BM + r] * s_do[r * D + d];
          acc_k += s_ds[c * BM + r] * s_q[r * D + d];
        }
        s_dk[i] = acc_k;
        s_dv[i] = acc_v;
      }
    }
  }
  sync_block();
  for (int i = tid; i < BN * D; i += kThreads) {
    const int c = i / D, d = i % D, key = n0 + c;
    if (key >= len) continue;
    if (is_prefix) {
      const int64_t slot = p.deterministic ? b : bank.entry;
      const int64_t offset = ((slot * p.kv_heads + hkv) * p.prefix_len + key) * D + d;
      if (p.deterministic) {
        p.part_dk[offset] = s_dk[i] * p.sm_scale;
        p.part_dv[offset] = s_dv[i];
      } else {
        atomic_add_f32(p.part_dk + offset, s_dk[i] * p.sm_scale);
        atomic_add_f32(p.part_dv + offset, s_dv[i]);
      }
    } else {
      store_from_float(p.dk, b * p.dk_sb + hkv * p.dk_sh + static_cast<int64_t>(key) * p.dk_sn + d * p.dk_sd, p.dtype,
                       s_dk[i] * p.sm_scale);
      store_from_float(p.dv, b * p.dv_sb + hkv * p.dv_sh + static_cast<int64_t>(key) * p.dv_sn + d * p.dv_sd, p.dtype,
                       s_dv[i]);
    }
  }
}

// ---- launcher -------------------------------------------------------------------------------------------------------

template <typename T, int kD>
static const char* launch_key_tiled(const Params& p, void* stream) {
  const int blocks = ceil_div(p.prefix_len, kKeyGradBlockN) + ceil_div(p.k_len, kKeyGradBlockN);
  const dim3 grid(blocks, p.kv_heads, p.batch);
  return launch_kernel(backward_key_tiled_kernel<T, kD>, grid, dim3(key_grad_warps(kD) * 32), key_grad_smem_bytes(kD),
                       stream, p);
}

const char* launch_backward_key_grads(const Params& p, void* stream) {
  if (is_16bit(p.dtype)) {
    return dispatch_16bit(p, [&](auto type, auto dim) {
      return launch_key_tiled<typename decltype(type)::type, decltype(dim)::value>(p, stream);
    });
  }
  const int blocks = ceil_div(p.prefix_len, kSimpleKeyN) + ceil_div(p.k_len, kSimpleKeyN);
  const dim3 grid(blocks, p.kv_heads, p.batch);
  return launch_kernel(backward_key_simple_kernel, grid, dim3(128), simple_key_grad_smem_bytes(p.head_dim), stream, p);
}

}  // namespace ptv2
