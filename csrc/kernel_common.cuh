// Device building blocks shared by the kernels: element types, the tensor-core and shared-memory instructions,
// swizzled shared-memory tiles, the tile loader, a sample's bank entry, visibility and dropout.
//
// Tensor cores: mma.sync.m16n8k16 with float32 accumulation on float16/bfloat16 operands (sm_80+). Operands come
// from shared memory through ldmatrix, or, for P (and dS) in the P·V (dS·K) products, straight from the
// registers that hold the score accumulators (the C fragment of two adjacent n8 tiles is the A fragment of one
// k16 step). Fragment layouts (PTX ISA, "mma.m16n8k16", f16/bf16), with g = lane / 4 and t = lane % 4:
//   A (16x16, row major): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B (16x8):             b[0] = (k = 2t..2t+1, n = g), b[1] = (k = 2t+8.., n = g)
//   C (16x8, float):      c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
//
// With PTV2_SIM defined the same code compiles as plain C++ for the host simulation of tests/cuda_sim, which runs
// a block's threads as cooperative fibers and emulates these instructions from the same layout tables.
#pragma once

#include <cstdint>

#ifdef PTV2_SIM
#include "ptv2_sim.h"
#else
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "params.h"
#include "philox.h"
#include "ptv2_api.h"

#ifdef PTV2_SIM
#define PTV2_DEVICE inline
#define PTV2_SHARED_MEMORY(name) unsigned char* name = ::ptv2_sim::shared_memory()
#else
#define PTV2_DEVICE __device__ __forceinline__
#define PTV2_SHARED_MEMORY(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace ptv2 {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- element types ------------------------------------------------------------------------------------------

template <typename T> struct DTypeOf;
template <> struct DTypeOf<__half> { static constexpr int value = kFloat16; };
template <> struct DTypeOf<__nv_bfloat16> { static constexpr int value = kBFloat16; };
template <> struct DTypeOf<float> { static constexpr int value = kFloat32; };

PTV2_DEVICE float to_float(float x) { return x; }
PTV2_DEVICE float to_float(__half x) { return __half2float(x); }
PTV2_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> PTV2_DEVICE T from_float(float x);
template <> PTV2_DEVICE float from_float<float>(float x) { return x; }
template <> PTV2_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> PTV2_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two floats rounded to T and packed into one 32-bit register, `lo` in the low half (the lower column).
template <typename T> PTV2_DEVICE uint32_t pack2(float lo, float hi);
template <> PTV2_DEVICE uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> PTV2_DEVICE uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

PTV2_DEVICE int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// ---- the one dtype x head-dim switch of the 16-bit (tensor-core) kernels ------------------------------------

template <typename T> struct TypeTag { using type = T; };
template <int D> struct HeadDimTag { static constexpr int value = D; };

inline bool is_16bit(int dtype) { return dtype == kFloat16 || dtype == kBFloat16; }

// launch(TypeTag<T>{}, HeadDimTag<kD>{}) for p's 16-bit dtype T and head-dim bucket kD (64, 128 or 256): every
// launcher of a kernel templated on <T, kD> dispatches here, so the instantiated set is stated once.
template <class Launch>
const char* dispatch_16bit(const Params& p, Launch&& launch) {
  auto by_head_dim = [&](auto type) -> const char* {
    switch (head_dim_bucket(p.head_dim)) {
      case 64: return launch(type, HeadDimTag<64>{});
      case 128: return launch(type, HeadDimTag<128>{});
      default: return launch(type, HeadDimTag<256>{});
    }
  };
  if (p.dtype == kFloat16) return by_head_dim(TypeTag<__half>{});
  return by_head_dim(TypeTag<__nv_bfloat16>{});
}

// Element `offset` of a tensor of runtime dtype (float16, bfloat16 or float32), as float.
PTV2_DEVICE float load_as_float(const void* base, int64_t offset, int dtype) {
  if (dtype == kFloat32) return static_cast<const float*>(base)[offset];
  if (dtype == kFloat16) return __half2float(static_cast<const __half*>(base)[offset]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[offset]);
}

PTV2_DEVICE void store_from_float(void* base, int64_t offset, int dtype, float x) {
  if (dtype == kFloat32) {
    static_cast<float*>(base)[offset] = x;
  } else if (dtype == kFloat16) {
    static_cast<__half*>(base)[offset] = __float2half_rn(x);
  } else {
    static_cast<__nv_bfloat16*>(base)[offset] = __float2bfloat16_rn(x);
  }
}

PTV2_DEVICE const void* offset_ptr(const void* base, int64_t elements, int dtype) {
  return static_cast<const char*>(base) + elements * dtype_size(dtype);
}

// ---- warp-level instructions ----------------------------------------------------------------------------------

PTV2_DEVICE float shfl_xor(float x, int lane_mask) {
#ifdef PTV2_SIM
  return ::ptv2_sim::shfl_xor(x, lane_mask);
#else
  return __shfl_xor_sync(0xffffffffu, x, lane_mask);
#endif
}

// Max / sum over the 4 lanes of a quad (the lanes holding one accumulator row).
PTV2_DEVICE float quad_max(float x) {
  x = fmaxf(x, shfl_xor(x, 1));
  return fmaxf(x, shfl_xor(x, 2));
}
PTV2_DEVICE float quad_sum(float x) {
  x += shfl_xor(x, 1);
  return x + shfl_xor(x, 2);
}

// d += a * b for one m16n8k16 step.
template <typename T>
PTV2_DEVICE void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
PTV2_DEVICE void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef PTV2_SIM
  ::ptv2_sim::mma16816(d, a, b0, b1, false);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
PTV2_DEVICE void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef PTV2_SIM
  ::ptv2_sim::mma16816(d, a, b0, b1, true);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ldmatrix .x4: four 8x8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j, and register j of lane
// l receives row l/4, elements 2(l%4), 2(l%4)+1 of matrix j (with .trans: column l/4, rows 2(l%4), 2(l%4)+1).
PTV2_DEVICE void ldsm_x4(uint32_t (&r)[4], const void* smem) {
#ifdef PTV2_SIM
  ::ptv2_sim::ldmatrix_x4(r, smem, false);
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#endif
}

PTV2_DEVICE void ldsm_x4_trans(uint32_t (&r)[4], const void* smem) {
#ifdef PTV2_SIM
  ::ptv2_sim::ldmatrix_x4(r, smem, true);
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#endif
}

// 16-byte asynchronous global -> shared copy (both addresses 16-byte aligned), grouped by commit, awaited by wait.
PTV2_DEVICE void cp_async_16(void* smem, const void* gmem) {
#ifdef PTV2_SIM
  ::ptv2_sim::cp_async_16(smem, gmem);
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(gmem));
#endif
}

PTV2_DEVICE void cp_async_commit() {
#ifdef PTV2_SIM
  ::ptv2_sim::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
PTV2_DEVICE void cp_async_wait() {
#ifdef PTV2_SIM
  ::ptv2_sim::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

PTV2_DEVICE void sync_warp() {
#ifdef PTV2_SIM
  ::ptv2_sim::syncwarp();
#else
  __syncwarp();
#endif
}

PTV2_DEVICE void sync_block() {
#ifdef PTV2_SIM
  ::ptv2_sim::syncthreads();
#else
  __syncthreads();
#endif
}

PTV2_DEVICE bool sync_block_or(bool predicate) {
#ifdef PTV2_SIM
  return ::ptv2_sim::syncthreads_or(predicate) != 0;
#else
  return __syncthreads_or(predicate ? 1 : 0) != 0;
#endif
}

PTV2_DEVICE uint32_t ballot(bool predicate) {
#ifdef PTV2_SIM
  return ::ptv2_sim::ballot(predicate);
#else
  return __ballot_sync(0xffffffffu, predicate);
#endif
}

PTV2_DEVICE int popcount(uint32_t x) {
#ifdef PTV2_SIM
  return __builtin_popcount(x);
#else
  return __popc(x);
#endif
}

PTV2_DEVICE void atomic_add_f32(float* address, float value) {
#ifdef PTV2_SIM
  *address += value;  // the simulation runs one thread at a time
#else
  atomicAdd(address, value);
#endif
}

// ---- swizzled shared-memory tiles ------------------------------------------------------------------------------
// A tile of R rows x kCols elements (kCols >= 64, 2-byte elements) stored in 16-byte chunks, chunk c of row r at
// position c ^ (r % 8): the 8 row addresses of an ldmatrix phase hit 8 different bank groups.

template <int kCols>
PTV2_DEVICE int swizzle(int row, int chunk) {
  static_assert(kCols >= 64 && kCols % 64 == 0, "swizzled tiles need rows of at least 64 elements");
  return row * kCols + ((chunk ^ (row & 7)) << 3);
}

// Offset of element (row, col) in a swizzled tile.
template <int kCols>
PTV2_DEVICE int swizzle_element(int row, int col) {
  return swizzle<kCols>(row, col >> 3) + (col & 7);
}

// A fragment of the m16 x k16 block at (m0, k0) of A, from a tile holding A ([m][k], kTrans false) or A^T ([k][m]).
template <int kCols, bool kTrans, typename T>
PTV2_DEVICE void load_a_frag(uint32_t (&a)[4], const T* tile, int m0, int k0, int lane) {
  if (!kTrans) {
    ldsm_x4(a, tile + swizzle<kCols>(m0 + (lane & 15), (k0 >> 3) + (lane >> 4)));
  } else {
    const int j = lane >> 3, i = lane & 7;
    ldsm_x4_trans(a, tile + swizzle<kCols>(k0 + ((j >> 1) << 3) + i, (m0 >> 3) + (j & 1)));
  }
}

// B fragments of the k16 x (n0..n0+15) block of B (two n8 tiles: b[0..1] for n0, b[2..3] for n0 + 8), from a tile
// holding B^T ([n][k], kTrans false: e.g. K for Q·K^T) or B ([k][n], kTrans true: e.g. V for P·V).
template <int kCols, bool kTrans, typename T>
PTV2_DEVICE void load_b_frag_pair(uint32_t (&b)[4], const T* tile, int n0, int k0, int lane) {
  const int j = lane >> 3, i = lane & 7;
  if (!kTrans) {
    ldsm_x4(b, tile + swizzle<kCols>(n0 + ((j >> 1) << 3) + i, (k0 >> 3) + (j & 1)));
  } else {
    ldsm_x4_trans(b, tile + swizzle<kCols>(k0 + ((j & 1) << 3) + i, (n0 >> 3) + (j >> 1)));
  }
}

// acc[MT][NT] += A[a_m0 .. a_m0 + 16 MT][k] * B[k][b_n0 .. b_n0 + 8 NT] over k in [0, 16 k_steps), both operands
// from swizzled shared tiles (A at k offset a_k0, B at k offset b_k0). Only the first `n_pairs` pairs of n8 tiles
// are computed (the rest would be columns past the head dim). Every lane of the warp must call it alike.
template <typename T, int MT, int NT, int kACols, bool kATrans, int kBCols, bool kBTrans>
PTV2_DEVICE void warp_mma(float (&acc)[MT][NT][4], const T* a_tile, int a_m0, int a_k0, const T* b_tile, int b_n0,
                          int b_k0, int k_steps, int n_pairs, int lane) {
  static_assert(NT % 2 == 0, "n8 tiles come in pairs");
  for (int ks = 0; ks < k_steps; ++ks) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) load_a_frag<kACols, kATrans>(a[mt], a_tile, a_m0 + 16 * mt, a_k0 + 16 * ks, lane);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      if (np < n_pairs) {
        uint32_t b[4];
        load_b_frag_pair<kBCols, kBTrans>(b, b_tile, b_n0 + 16 * np, b_k0 + 16 * ks, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
          mma16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }
}

// acc[NT_OUT] += P[16 x 16 k_pairs] * B[k][n], P held in registers as the C fragments p[2 k_pairs][4] of a warp's
// score tile (rounded to T here), B from a swizzled tile holding B ([k][n], rows b_k0..) — e.g. O += P·V.
template <typename T, int NT_P, int NT_OUT, int kBCols>
PTV2_DEVICE void warp_mma_regs_a(float (&acc)[NT_OUT][4], const float (&p)[NT_P][4], const T* b_tile, int b_k0,
                                 int n_pairs, int lane) {
  static_assert(NT_P % 2 == 0 && NT_OUT % 2 == 0, "n8 tiles come in pairs");
#pragma unroll
  for (int kk = 0; kk < NT_P / 2; ++kk) {
    const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int np = 0; np < NT_OUT / 2; ++np) {
      if (np < n_pairs) {
        uint32_t b[4];
        load_b_frag_pair<kBCols, true>(b, b_tile, 16 * np, b_k0 + 16 * kk, lane);
        mma16816<T>(acc[2 * np], a, b[0], b[1]);
        mma16816<T>(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
  }
}

// ---- global -> shared tile loads --------------------------------------------------------------------------------

// Rows of a [rows, head_dim] view of a tensor, to be copied into a swizzled tile of T.
struct RowSource {
  const void* base = nullptr;  // element (0, 0)
  int64_t row_stride = 0;      // elements
  int64_t col_stride = 1;
  int dtype = kFloat16;
  bool vec = false;  // 16-byte copies allowed (dtype is T, unit col stride, 16-byte aligned rows)
};

// Copy one 8-element chunk (row pointer `row`, or zeros when null) into dst: cp.async when the whole chunk is
// in range and the source allows it, else element by element with conversion to T and zeros past head_dim.
template <typename T>
PTV2_DEVICE void load_chunk(T* dst, const void* row, const RowSource& src, int col, int head_dim) {
  if (row == nullptr) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    return;
  }
  if (src.vec && col + 8 <= head_dim) {
    cp_async_16(dst, offset_ptr(row, col, src.dtype));
    return;
  }
  alignas(16) T values[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int c = col + e;
    values[e] = from_float<T>(c < head_dim ? load_as_float(row, c * src.col_stride, src.dtype) : 0.f);
  }
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(values);
}

// Load rows [row0, row0 + kRows) of `src` (rows at or past `row_end` read as zeros) into a swizzled [kRows][kCols]
// tile, by `n_threads` threads numbered `tid`. Only the first `d_chunks` 8-column chunks are written: the kernels
// never read past them. Completion: cp_async_commit + cp_async_wait + a barrier.
template <typename T, int kRows, int kCols>
PTV2_DEVICE void load_tile(T* tile, const RowSource& src, int row0, int row_end, int head_dim, int d_chunks, int tid,
                           int n_threads) {
  constexpr int kChunks = kCols / 8;
  for (int i = tid; i < kRows * kChunks; i += n_threads) {
    const int r = i / kChunks, c = i % kChunks;
    if (c >= d_chunks) continue;
    const int row = row0 + r;
    const void* row_ptr = row < row_end ? offset_ptr(src.base, static_cast<int64_t>(row) * src.row_stride, src.dtype)
                                        : nullptr;
    load_chunk(tile + swizzle<kCols>(r, c), row_ptr, src, c * 8, head_dim);
  }
}

// ---- the op's semantics -------------------------------------------------------------------------------------------

struct BankEntry {
  int64_t entry;  // bank entry of the sample (0 when its index is out of range)
  int keys;       // prefix keys it sees: prefix_lengths[entry] clamped to [0, P]; 0 when the index is out of range
  bool index_ok;  // the index was in range (else the forward writes NaN rows)
};

// The host checks the index; the device guards anyway: an entry out of range reads no prefix.
PTV2_DEVICE BankEntry bank_entry(const Params& p, int64_t b) {
  int64_t entry = 0;
  if (p.prefix_index != nullptr) {
    entry = p.index_64 ? static_cast<const int64_t*>(p.prefix_index)[b]
                       : static_cast<int64_t>(static_cast<const int32_t*>(p.prefix_index)[b]);
  }
  const bool ok = entry >= 0 && entry < p.num_prefixes;
  if (!ok) entry = 0;
  int64_t keys = p.prefix_len;
  if (p.prefix_lengths != nullptr) {
    keys = p.lengths_64 ? static_cast<const int64_t*>(p.prefix_lengths)[entry]
                        : static_cast<int64_t>(static_cast<const int32_t*>(p.prefix_lengths)[entry]);
    keys = keys < 0 ? 0 : (keys > p.prefix_len ? p.prefix_len : keys);
  }
  return BankEntry{entry, ok ? static_cast<int>(keys) : 0, ok};
}

// Masks that apply to the sequence keys of one (sample, query head).
struct SeqMask {
  const uint8_t* key_pad;  // row of the key-padding mask of the sample, or nullptr
  int64_t kp_sn;
  const uint8_t* dense;  // the dense mask of (sample, head), or nullptr
  int64_t dm_sm, dm_sn;
};

PTV2_DEVICE SeqMask seq_mask(const Params& p, int64_t b, int h) {
  SeqMask m;
  m.key_pad = p.key_pad != nullptr ? p.key_pad + b * p.kp_sb : nullptr;
  m.kp_sn = p.kp_sn;
  m.dense = p.dense != nullptr ? p.dense + b * p.dm_sb + static_cast<int64_t>(h) * p.dm_sh : nullptr;
  m.dm_sm = p.dm_sm;
  m.dm_sn = p.dm_sn;
  return m;
}

// Whether query `row` sees sequence key `col` (bounds, bottom-right causal, key padding, dense mask).
PTV2_DEVICE bool seq_visible(const Params& p, const SeqMask& m, int row, int col) {
  if (col >= p.k_len || col < 0) return false;
  if (p.causal && col > row + (p.k_len - p.q_len)) return false;
  if (m.key_pad != nullptr && m.key_pad[col * m.kp_sn] == 0) return false;
  if (m.dense != nullptr && (row >= p.q_len || m.dense[row * m.dm_sm + col * m.dm_sn] == 0)) return false;
  return true;
}

// Whether a sequence key tile [n0, n0 + n) needs per-element masks for query rows [m0, m0 + m).
PTV2_DEVICE bool seq_tile_needs_mask(const Params& p, int m0, int n0, int n) {
  if (n0 + n > p.k_len || p.key_pad != nullptr || p.dense != nullptr) return true;
  return p.causal && n0 + n - 1 > m0 + (p.k_len - p.q_len);
}

PTV2_DEVICE uint64_t load_seed(const Params& p) {
  return p.has_dropout ? static_cast<uint64_t>(*p.seed) : 0ull;
}

#ifdef PTV2_SIM
inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
#else
__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }
#endif

}  // namespace ptv2
