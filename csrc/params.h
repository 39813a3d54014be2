// The kernels' parameter block and tile configurations, shared by api.cpp (host) and the .cu files.
//
// One struct serves every kernel: api.cpp fills it from the TensorRefs of ptv2_api.h and the launchers read the
// fields their kernels need. Strides are in elements; pointers are device pointers already at element 0 of their
// tensor. Nothing here includes torch or CUDA headers.
#pragma once

#include <cstdint>

namespace ptv2 {

struct Params {
  // ---- inputs ---------------------------------------------------------------------------------------------
  const void* q = nullptr;  // [B, Hq, Nq, D], dtype T (float16, bfloat16 or float32), unit last stride
  const void* k = nullptr;  // [B, Hkv, Nk, D], dtype T, unit last stride
  const void* v = nullptr;
  int64_t q_sb = 0, q_sh = 0, q_sm = 0;
  int64_t k_sb = 0, k_sh = 0, k_sn = 0;
  int64_t v_sb = 0, v_sh = 0, v_sn = 0;
  const void* pk = nullptr;  // [T, Hkv, P, D], dtype prefix_dtype, any strides
  const void* pv = nullptr;
  int64_t pk_st = 0, pk_sh = 0, pk_sn = 0, pk_sd = 0;
  int64_t pv_st = 0, pv_sh = 0, pv_sn = 0, pv_sd = 0;
  int32_t dtype = 0;         // DType of q/k/v/out
  int32_t prefix_dtype = 0;  // DType of the prefix bank (and of its gradients)
  // Whether a tensor's rows may be copied 16 bytes at a time (cp.async): same dtype as T, unit last stride,
  // 16-byte aligned base and row strides.
  bool q_vec = false, k_vec = false, v_vec = false, pk_vec = false, pv_vec = false;

  const void* prefix_index = nullptr;  // [B], int32 or int64 (index_64); nullptr: every sample uses entry 0
  bool index_64 = false;
  const void* prefix_lengths = nullptr;  // [T], int32 or int64 (lengths_64); nullptr: every entry uses all P keys
  bool lengths_64 = false;

  const uint8_t* key_pad = nullptr;  // [B, Nk] (bool as bytes), or nullptr
  int64_t kp_sb = 0, kp_sn = 0;
  const uint8_t* dense = nullptr;  // [B, Hq, Nq, Nk] (bool as bytes, strides may be 0), or nullptr
  int64_t dm_sb = 0, dm_sh = 0, dm_sm = 0, dm_sn = 0;
  const int64_t* seed = nullptr;  // device scalar, read when has_dropout

  int32_t batch = 0, q_heads = 0, kv_heads = 0, group = 1, q_len = 0, k_len = 0;
  int32_t num_prefixes = 1, prefix_len = 0, head_dim = 0;
  float qk_scale_log2 = 0.f;  // scale * log2(e): scores in the exp2 domain
  float sm_scale = 0.f;       // scale
  float dropout_p = 0.f;
  float dropout_scale = 1.f;  // 1 / (1 - dropout_p), computed in float32 like the Triton kernels
  bool causal = false;
  bool has_dropout = false;

  // ---- forward outputs ------------------------------------------------------------------------------------
  void* out = nullptr;  // [B, Hq, Nq, D], dtype T, unit last stride
  int64_t o_sb = 0, o_sh = 0, o_sm = 0;
  float* lse = nullptr;  // [B, Hq, Nq] contiguous

  // ---- decode (split-KV) ------------------------------------------------------------------------------------
  float* part_o = nullptr;   // [slots, B*Hq*Nq, D]: unnormalized partial outputs
  float* part_ml = nullptr;  // [slots, B*Hq*Nq, 2]: (running max in log2 units, sum of probabilities)
  int32_t decode_chunk = 0;       // keys per tile of the decode kernel
  int32_t n_pchunks = 0;          // prefix slots: ceil(P / decode_chunk)
  int32_t n_splits = 0;           // sequence slots
  int32_t keys_per_split = 0;     // a multiple of decode_chunk
  int32_t n_rowtiles = 0;         // ceil(group * Nq / 16)
  int32_t n_seq_items = 0;        // B * Hkv * n_rowtiles * n_splits
  int32_t n_prefix_items = 0;     // B * Hkv * n_pchunks

  // ---- backward -----------------------------------------------------------------------------------------------
  const void* dout = nullptr;  // [B, Hq, Nq, D], dtype T, any strides
  int64_t do_sb = 0, do_sh = 0, do_sm = 0, do_sd = 0;
  bool do_vec = false;
  const float* dlse = nullptr;  // [B, Hq, Nq] or nullptr
  int64_t dl_sb = 0, dl_sh = 0, dl_sm = 0;
  float* delta = nullptr;       // [B, Hq, Nq] workspace: rowsum(dO * O) - dlse
  void* dq = nullptr;
  int64_t dq_sb = 0, dq_sh = 0, dq_sm = 0, dq_sd = 0;
  void* dk = nullptr;
  int64_t dk_sb = 0, dk_sh = 0, dk_sn = 0, dk_sd = 0;
  void* dv = nullptr;
  int64_t dv_sb = 0, dv_sh = 0, dv_sn = 0, dv_sd = 0;
  float* part_dk = nullptr;  // [slots, Hkv, P, D] float32 workspace: per bank entry (atomics) or per sample
  float* part_dv = nullptr;
  void* dpk = nullptr;  // [T, Hkv, P, D], prefix dtype, any strides
  int64_t dpk_st = 0, dpk_sh = 0, dpk_sn = 0, dpk_sd = 0;
  void* dpv = nullptr;
  int64_t dpv_st = 0, dpv_sh = 0, dpv_sn = 0, dpv_sd = 0;
  bool deterministic = false;
};

// ---- tile configurations (kD: the head-dim bucket 64, 128 or 256; head dims below it are masked) ----------------

constexpr int head_dim_bucket(int head_dim) { return head_dim <= 64 ? 64 : (head_dim <= 128 ? 128 : 256); }

// Tensor-core forward and dQ: 4 warps, 16 query rows each.
constexpr int kTiledBlockM = 64;
constexpr int tiled_block_n(int kD) { return kD == 256 ? 32 : 64; }
constexpr int forward_smem_bytes(int kD) { return (kTiledBlockM + 2 * tiled_block_n(kD)) * kD * 2; }
constexpr int dq_smem_bytes(int kD) { return (2 * kTiledBlockM + 2 * tiled_block_n(kD)) * kD * 2; }

// Tensor-core dK/dV: 64 keys x 64 queries per step.
constexpr int kKeyGradBlockN = 64;
constexpr int kKeyGradBlockM = 64;
constexpr int key_grad_warps(int kD) { return kD == 64 ? 4 : 8; }
constexpr int key_grad_smem_bytes(int kD) {
  return (2 * kKeyGradBlockN + 2 * kKeyGradBlockM) * kD * 2 + 2 * kKeyGradBlockN * kKeyGradBlockM * 2 +
         2 * kKeyGradBlockM * 4;
}

// Decode: 4 warps; a tile of decode_chunk keys is shared by the warps (kSub keys each).
constexpr int kDecodeWarps = 4;
constexpr int decode_sub_keys(int kD) { return kD == 64 ? 64 : (kD == 128 ? 32 : 16); }
constexpr int decode_chunk_keys(int kD) { return kDecodeWarps * decode_sub_keys(kD); }
// K and V tiles, a 16-row Q tile per warp, and the list of samples sharing a bank entry (128 ints, 4 counts).
constexpr int kDecodeRunCapacity = 128;
constexpr int decode_smem_bytes(int kD) {
  return (2 * decode_chunk_keys(kD) + kDecodeWarps * 16) * kD * 2 + kDecodeRunCapacity * 4 + 16;
}

// The decode kernel's work split; fills the decode fields of p. Work items: (sample, kv head, 16-row tile of its
// group * Nq query rows, key split) over the sequence, and (sample, kv head, prefix chunk) for the prefix, of
// which only the first sample of each bank entry works (for all the samples of that entry).
inline void plan_decode(Params& p, int num_sms) {
  const int kD = head_dim_bucket(p.head_dim);
  const int chunk = decode_chunk_keys(kD);
  p.decode_chunk = chunk;
  p.n_pchunks = (p.prefix_len + chunk - 1) / chunk;
  p.n_rowtiles = (p.group * p.q_len + 15) / 16;
  const int64_t base = static_cast<int64_t>(p.batch) * p.kv_heads * p.n_rowtiles;
  if (p.k_len == 0 || base == 0) {
    p.n_splits = 0;
    p.keys_per_split = chunk;
  } else {
    // Enough blocks for about four per multiprocessor, but no split shorter than one tile.
    const int64_t max_splits = (p.k_len + chunk - 1) / chunk;
    int64_t splits = (4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1) + base - 1) / base;
    splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
    const int64_t per_split = (p.k_len + splits - 1) / splits;
    p.keys_per_split = static_cast<int32_t>((per_split + chunk - 1) / chunk * chunk);
    p.n_splits = (p.k_len + p.keys_per_split - 1) / p.keys_per_split;
  }
  p.n_seq_items = static_cast<int32_t>(base * p.n_splits);
  p.n_prefix_items = p.batch * p.kv_heads * p.n_pchunks;
}

// CUDA-core (float32) kernels: head_dim is a runtime size, shared memory is sized by it.
constexpr int kSimpleFwdM = 16, kSimpleFwdN = 32;
constexpr int kSimpleKeyN = 16, kSimpleKeyM = 16;
constexpr int kSimpleQueryM = 16, kSimpleQueryN = 32;
inline int simple_forward_smem_bytes(int d) { return 4 * (2 * kSimpleFwdM * d + 2 * kSimpleFwdN * d + kSimpleFwdM * kSimpleFwdN + 3 * kSimpleFwdM); }
inline int simple_key_grad_smem_bytes(int d) {
  return 4 * (4 * kSimpleKeyN * d + 2 * kSimpleKeyM * d + 2 * kSimpleKeyN * kSimpleKeyM + 2 * kSimpleKeyM);
}
inline int simple_query_grad_smem_bytes(int d) {
  return 4 * (3 * kSimpleQueryM * d + 2 * kSimpleQueryN * d + kSimpleQueryM * kSimpleQueryN + 2 * kSimpleQueryM);
}

// ---- launchers (defined in the .cu files; return nullptr or an error message) ----------------------------------
const char* launch_forward_tiled(const Params& p, void* stream);
const char* launch_forward_decode(const Params& p, void* stream);  // the split kernel, then the combine kernel
const char* launch_backward_preprocess(const Params& p, void* stream);
const char* launch_backward_key_grads(const Params& p, void* stream);
const char* launch_backward_query_grads(const Params& p, void* stream);
const char* launch_prefix_grad_finalize(const Params& p, void* stream);
const char* launch_dropout_mask_kernel(uint8_t* keep, const int64_t* seed, int64_t batch, int64_t q_heads,
                                       int64_t q_len, int64_t cols, float dropout_p, void* stream);
const char* memset_async(void* ptr, int value, size_t bytes, void* stream);
const char* arch_list_string();

}  // namespace ptv2
