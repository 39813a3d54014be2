// ptv2_api.h on top of the kernel launchers: checks, the parameter block, workspace layout, launch order.
// Torch-free and CUDA-free (plain C++); the host simulation of tests/cuda_sim compiles it unchanged.
#include "ptv2_api.h"

#include <cmath>
#include <cstring>
#include <string>

#include "params.h"
#include "philox.h"

namespace ptv2 {

namespace {

int element_size(int dtype) {
  switch (dtype) {
    case kFloat16:
    case kBFloat16: return 2;
    case kFloat32:
    case kInt32: return 4;
    case kInt64: return 8;
    default: return 1;
  }
}

bool is_float(int dtype) { return dtype == kFloat16 || dtype == kBFloat16 || dtype == kFloat32; }

std::string shape_of(const TensorRef& t) {
  std::string s = "[";
  for (int i = 0; i < t.dim; ++i) s += (i ? ", " : "") + std::to_string(t.size[i]);
  return s + "]";
}

// 16-byte copies of a tensor's rows are allowed: it has dtype `want`, a unit last stride, and a 16-byte aligned
// base and outer strides.
bool rows_vectorizable(const TensorRef& t, int want) {
  if (t.dtype != want || t.dim < 1) return false;
  const int last = t.dim - 1;
  if (t.size[last] > 1 && t.stride[last] != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  for (int i = 0; i < last; ++i) {
    if (t.size[i] > 1 && (t.stride[i] * element_size(t.dtype)) % 16 != 0) return false;
  }
  return true;
}

int64_t align_up(int64_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

// Bytes of dynamic shared memory the kernels a problem may use need (forward, decode and backward).
int64_t shared_memory_bytes(int dtype, int head_dim) {
  if (dtype == kFloat32) {
    const int64_t a = simple_forward_smem_bytes(head_dim), b = simple_key_grad_smem_bytes(head_dim);
    const int64_t c = simple_query_grad_smem_bytes(head_dim);
    return a > b ? (a > c ? a : c) : (b > c ? b : c);
  }
  const int kD = head_dim_bucket(head_dim);
  int64_t most = forward_smem_bytes(kD);
  const int64_t others[] = {dq_smem_bytes(kD), key_grad_smem_bytes(kD), decode_smem_bytes(kD)};
  for (int64_t x : others) most = x > most ? x : most;
  return most;
}

namespace {

// The parameter block of the inputs (forward and backward alike).
Params input_params(const AttentionProblem& pr) {
  Params p;
  const TensorRef &q = pr.q, &k = pr.k, &v = pr.v, &pk = pr.prefix_k, &pv = pr.prefix_v;
  p.q = q.data, p.k = k.data, p.v = v.data, p.pk = pk.data, p.pv = pv.data;
  p.q_sb = q.stride[0], p.q_sh = q.stride[1], p.q_sm = q.stride[2];
  p.k_sb = k.stride[0], p.k_sh = k.stride[1], p.k_sn = k.stride[2];
  p.v_sb = v.stride[0], p.v_sh = v.stride[1], p.v_sn = v.stride[2];
  p.pk_st = pk.stride[0], p.pk_sh = pk.stride[1], p.pk_sn = pk.stride[2], p.pk_sd = pk.stride[3];
  p.pv_st = pv.stride[0], p.pv_sh = pv.stride[1], p.pv_sn = pv.stride[2], p.pv_sd = pv.stride[3];
  p.dtype = q.dtype;
  p.prefix_dtype = pk.dtype;
  p.q_vec = rows_vectorizable(q, q.dtype);
  p.k_vec = rows_vectorizable(k, q.dtype);
  p.v_vec = rows_vectorizable(v, q.dtype);
  p.pk_vec = rows_vectorizable(pk, q.dtype);
  p.pv_vec = rows_vectorizable(pv, q.dtype);
  if (pr.prefix_index.defined) {
    p.prefix_index = pr.prefix_index.data;
    p.index_64 = pr.prefix_index.dtype == kInt64;
  }
  if (pr.prefix_lengths.defined) {
    p.prefix_lengths = pr.prefix_lengths.data;
    p.lengths_64 = pr.prefix_lengths.dtype == kInt64;
  }
  if (pr.attn_mask.defined) {
    const TensorRef& m = pr.attn_mask;
    if (m.dim == 2) {
      p.key_pad = static_cast<const uint8_t*>(m.data);
      p.kp_sb = m.stride[0], p.kp_sn = m.stride[1];
    } else {
      p.dense = static_cast<const uint8_t*>(m.data);
      p.dm_sb = m.stride[0], p.dm_sh = m.stride[1], p.dm_sm = m.stride[2], p.dm_sn = m.stride[3];
    }
  }
  p.batch = static_cast<int32_t>(q.size[0]);
  p.q_heads = static_cast<int32_t>(q.size[1]);
  p.q_len = static_cast<int32_t>(q.size[2]);
  p.head_dim = static_cast<int32_t>(q.size[3]);
  p.kv_heads = static_cast<int32_t>(k.size[1]);
  p.k_len = static_cast<int32_t>(k.size[2]);
  p.group = p.kv_heads > 0 ? p.q_heads / p.kv_heads : 1;
  p.num_prefixes = static_cast<int32_t>(pk.size[0]);
  p.prefix_len = static_cast<int32_t>(pk.size[2]);
  p.causal = pr.causal;
  // Rounded like the Triton kernels' arguments: the products in double, then float32.
  p.qk_scale_log2 = static_cast<float>(pr.scale * 1.4426950408889634);
  p.sm_scale = static_cast<float>(pr.scale);
  p.has_dropout = pr.dropout_p > 0.0;
  p.dropout_p = static_cast<float>(pr.dropout_p);
  p.dropout_scale = p.has_dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  p.seed = p.has_dropout ? static_cast<const int64_t*>(pr.seed.data) : nullptr;
  return p;
}

bool decode_fits_grid(const Params& p) {
  const int64_t base = static_cast<int64_t>(p.batch) * p.kv_heads * ((p.group * static_cast<int64_t>(p.q_len) + 15) / 16);
  const int64_t splits = (p.k_len + 15) / 16 + 1;
  return base * splits + static_cast<int64_t>(p.batch) * p.kv_heads * (p.prefix_len / 16 + 1) < (int64_t{1} << 31);
}

}  // namespace

std::string check_problem(const AttentionProblem& pr) {
  const TensorRef &q = pr.q, &k = pr.k, &v = pr.v, &pk = pr.prefix_k, &pv = pr.prefix_v;
  if (q.dim != 4 || k.dim != 4 || v.dim != 4) return "q, k and v must be 4-D";
  if (pk.dim != 4 || pv.dim != 4) return "prefix_k and prefix_v must be a 4-D bank [T, Hkv, P, D]";
  if (!is_float(q.dtype) || k.dtype != q.dtype || v.dtype != q.dtype) {
    return "q, k and v must share a dtype among float16, bfloat16 and float32";
  }
  if (!is_float(pk.dtype) || pv.dtype != pk.dtype) {
    return "prefix_k and prefix_v must share a dtype among float16, bfloat16 and float32";
  }
  const int64_t B = q.size[0], Hq = q.size[1], Nq = q.size[2], D = q.size[3];
  const int64_t Hkv = k.size[1], Nk = k.size[2], T = pk.size[0], P = pk.size[2];
  for (int i = 0; i < 4; ++i) {
    if (k.size[i] != v.size[i]) return "k and v must have the same shape";
    if (pk.size[i] != pv.size[i]) return "prefix_k and prefix_v must have the same shape";
  }
  if (k.size[0] != B || k.size[3] != D || pk.size[1] != Hkv || pk.size[3] != D) {
    return "q " + shape_of(q) + ", k " + shape_of(k) + " and prefix " + shape_of(pk) + " do not match";
  }
  if (Hkv == 0 || Hq % Hkv != 0) return "Hq must be a multiple of Hkv";
  if (D < 1 || D > kMaxHeadDim) {
    return "head dim " + std::to_string(D) + " is outside [1, " + std::to_string(kMaxHeadDim) + "]";
  }
  for (const TensorRef* t : {&q, &k, &v}) {
    if (t->size[3] > 1 && t->stride[3] != 1) return "q, k and v must have a contiguous last dim";
  }
  if (B > kMaxGridDim || Hq > kMaxGridDim) {
    return "B and Hq must be at most " + std::to_string(kMaxGridDim) + " (grid limits)";
  }
  if (T < 1) return "the prefix bank must hold at least one entry";
  const int64_t limit = int64_t{1} << kSizeBits;
  if (Nq >= limit || Nk >= limit || P >= limit || B * Hq * Nq >= limit) return "sizes must stay below 2**31";
  if (pr.dropout_p > 0.0 && Nq * (P + Nk) >= limit) return "with dropout Nq * (P + Nk) must be below 2**31";
  if (pr.dropout_p > 0.0 && (!pr.seed.defined || pr.seed.dtype != kInt64)) return "dropout needs an int64 seed";
  if (pr.prefix_index.defined) {
    const TensorRef& t = pr.prefix_index;
    if (t.dim != 1 || t.size[0] != B || (t.dtype != kInt32 && t.dtype != kInt64) || (B > 1 && t.stride[0] != 1)) {
      return "prefix_index must be a contiguous int32/int64 tensor [B]";
    }
  } else if (T != 1) {
    return "prefix_index is required when the bank holds several prefixes";
  }
  if (pr.prefix_lengths.defined) {
    const TensorRef& t = pr.prefix_lengths;
    if (t.dim != 1 || t.size[0] != T || (t.dtype != kInt32 && t.dtype != kInt64) || (T > 1 && t.stride[0] != 1)) {
      return "prefix_lengths must be a contiguous int32/int64 tensor [T]";
    }
  }
  if (pr.attn_mask.defined) {
    const TensorRef& m = pr.attn_mask;
    if (m.dtype != kUInt8) return "attn_mask must be passed as bytes (a bool tensor viewed as uint8)";
    const bool padding = m.dim == 2 && m.size[0] == B && m.size[1] == Nk;
    const bool dense = m.dim == 4 && m.size[0] == B && m.size[1] == Hq && m.size[2] == Nq && m.size[3] == Nk;
    if (!padding && !dense) return "attn_mask must be [B, Nk] or expanded to [B, Hq, Nq, Nk]";
  }
  return "";
}

ForwardAlgo resolve_forward_algo(const AttentionProblem& pr, ForwardAlgo algo) {
  if (algo != kForwardAuto) return algo;
  const bool half = pr.q.dtype == kFloat16 || pr.q.dtype == kBFloat16;
  if (half && pr.q.size[2] <= kMaxDecodeQueries && decode_fits_grid(input_params(pr))) return kForwardDecode;
  return kForwardTiled;
}

size_t forward_workspace_bytes(const AttentionProblem& pr, ForwardAlgo algo, const DeviceInfo& device) {
  if (resolve_forward_algo(pr, algo) != kForwardDecode) return 0;
  Params p = input_params(pr);
  plan_decode(p, device.num_sms);
  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_heads * p.q_len;
  const int64_t slots = p.n_pchunks + p.n_splits;
  return static_cast<size_t>(align_up(slots * rows * p.head_dim * 4) + align_up(slots * rows * 2 * 4));
}

std::string run_forward(const AttentionProblem& pr, const ForwardOutputs& outputs, ForwardAlgo algo, void* workspace,
                        size_t workspace_bytes, const DeviceInfo& device, void* stream) {
  std::string error = check_problem(pr);
  if (!error.empty()) return error;
  const int64_t needed = shared_memory_bytes(pr.q.dtype, static_cast<int>(pr.q.size[3]));
  if (needed > device.max_shared_memory) {
    return "the kernels need " + std::to_string(needed) + " bytes of shared memory per block, the device allows " +
           std::to_string(device.max_shared_memory);
  }
  algo = resolve_forward_algo(pr, algo);
  if (algo == kForwardDecode) {
    if (pr.q.dtype == kFloat32) return "the decode kernel serves float16 and bfloat16 inputs only";
    if (pr.q.size[2] > kMaxDecodeQueries) return "the decode kernel serves at most 16 queries";
    if (!decode_fits_grid(input_params(pr))) return "the problem is too large for the decode kernel's grid";
  }
  Params p = input_params(pr);
  const TensorRef& out = outputs.out;
  if (out.dim != 4 || out.dtype != pr.q.dtype || (out.size[3] > 1 && out.stride[3] != 1)) {
    return "out must be [B, Hq, Nq, D] in q's dtype with a contiguous last dim";
  }
  p.out = out.data;
  p.o_sb = out.stride[0], p.o_sh = out.stride[1], p.o_sm = out.stride[2];
  p.lse = static_cast<float*>(outputs.lse.data);
  if (static_cast<int64_t>(p.batch) * p.q_heads * p.q_len == 0) return "";

  const char* launch_error = nullptr;
  if (algo == kForwardDecode) {
    plan_decode(p, device.num_sms);
    if (workspace_bytes < forward_workspace_bytes(pr, algo, device)) return "the decode workspace is too small";
    const int64_t rows = static_cast<int64_t>(p.batch) * p.q_heads * p.q_len;
    const int64_t slots = p.n_pchunks + p.n_splits;
    p.part_o = static_cast<float*>(workspace);
    p.part_ml = reinterpret_cast<float*>(static_cast<char*>(workspace) + align_up(slots * rows * p.head_dim * 4));
    launch_error = launch_forward_decode(p, stream);
  } else {
    launch_error = launch_forward_tiled(p, stream);
  }
  return launch_error == nullptr ? "" : launch_error;
}

size_t backward_workspace_bytes(const AttentionProblem& pr, const BackwardInputs& in) {
  const int64_t B = pr.q.size[0], Hq = pr.q.size[1], Nq = pr.q.size[2], D = pr.q.size[3];
  const int64_t Hkv = pr.k.size[1], T = pr.prefix_k.size[0], P = pr.prefix_k.size[2];
  const int64_t slots = in.deterministic ? B : T;
  return static_cast<size_t>(align_up(B * Hq * Nq * 4) + 2 * align_up(slots * Hkv * P * D * 4));
}

std::string run_backward(const AttentionProblem& pr, const BackwardInputs& in, const BackwardOutputs& outs,
                         void* workspace, size_t workspace_bytes, const DeviceInfo& device, void* stream) {
  std::string error = check_problem(pr);
  if (!error.empty()) return error;
  const int64_t needed = shared_memory_bytes(pr.q.dtype, static_cast<int>(pr.q.size[3]));
  if (needed > device.max_shared_memory) {
    return "the kernels need " + std::to_string(needed) + " bytes of shared memory per block, the device allows " +
           std::to_string(device.max_shared_memory);
  }
  if (workspace_bytes < backward_workspace_bytes(pr, in)) return "the backward workspace is too small";
  if (in.grad_out.dtype != pr.q.dtype || in.out.dtype != pr.q.dtype) return "grad_out and out must have q's dtype";
  if (in.out.size[3] > 1 && in.out.stride[3] != 1) return "out must have a contiguous last dim";
  if (in.grad_lse.defined && in.grad_lse.dtype != kFloat32) return "grad_lse must be float32";
  Params p = input_params(pr);
  p.out = in.out.data;
  p.o_sb = in.out.stride[0], p.o_sh = in.out.stride[1], p.o_sm = in.out.stride[2];
  p.lse = static_cast<float*>(in.lse.data);
  const TensorRef& g = in.grad_out;
  p.dout = g.data;
  p.do_sb = g.stride[0], p.do_sh = g.stride[1], p.do_sm = g.stride[2], p.do_sd = g.stride[3];
  p.do_vec = rows_vectorizable(g, pr.q.dtype);
  if (in.grad_lse.defined) {
    p.dlse = static_cast<const float*>(in.grad_lse.data);
    p.dl_sb = in.grad_lse.stride[0], p.dl_sh = in.grad_lse.stride[1], p.dl_sm = in.grad_lse.stride[2];
  }
  p.dq = outs.dq.data;
  p.dq_sb = outs.dq.stride[0], p.dq_sh = outs.dq.stride[1], p.dq_sm = outs.dq.stride[2], p.dq_sd = outs.dq.stride[3];
  p.dk = outs.dk.data;
  p.dk_sb = outs.dk.stride[0], p.dk_sh = outs.dk.stride[1], p.dk_sn = outs.dk.stride[2], p.dk_sd = outs.dk.stride[3];
  p.dv = outs.dv.data;
  p.dv_sb = outs.dv.stride[0], p.dv_sh = outs.dv.stride[1], p.dv_sn = outs.dv.stride[2], p.dv_sd = outs.dv.stride[3];
  const TensorRef &gk = outs.dprefix_k, &gv = outs.dprefix_v;
  if (gk.dtype != pr.prefix_k.dtype || gv.dtype != pr.prefix_k.dtype) return "prefix gradients must have its dtype";
  p.dpk = gk.data;
  p.dpk_st = gk.stride[0], p.dpk_sh = gk.stride[1], p.dpk_sn = gk.stride[2], p.dpk_sd = gk.stride[3];
  p.dpv = gv.data;
  p.dpv_st = gv.stride[0], p.dpv_sh = gv.stride[1], p.dpv_sn = gv.stride[2], p.dpv_sd = gv.stride[3];
  p.deterministic = in.deterministic;

  const int64_t rows = static_cast<int64_t>(p.batch) * p.q_heads * p.q_len;
  const int64_t slots = in.deterministic ? p.batch : p.num_prefixes;
  const int64_t partial = slots * p.kv_heads * p.prefix_len * p.head_dim * 4;
  char* base = static_cast<char*>(workspace);
  p.delta = reinterpret_cast<float*>(base);
  p.part_dk = reinterpret_cast<float*>(base + align_up(rows * 4));
  p.part_dv = reinterpret_cast<float*>(base + align_up(rows * 4) + align_up(partial));

  const char* launch_error = memset_async(p.part_dk, 0, static_cast<size_t>(2 * align_up(partial)), stream);
  if (launch_error == nullptr && rows > 0) launch_error = launch_backward_preprocess(p, stream);
  if (launch_error == nullptr && p.batch > 0 && p.prefix_len + p.k_len > 0) {
    launch_error = launch_backward_key_grads(p, stream);
  }
  if (launch_error == nullptr && rows > 0) launch_error = launch_backward_query_grads(p, stream);
  if (launch_error == nullptr && p.prefix_len > 0) launch_error = launch_prefix_grad_finalize(p, stream);
  return launch_error == nullptr ? "" : launch_error;
}

std::string run_dropout_mask(uint8_t* keep, const int64_t* seed, int64_t batch, int64_t q_heads, int64_t q_len,
                             int64_t cols, double dropout_p, void* stream) {
  const char* error =
      launch_dropout_mask_kernel(keep, seed, batch, q_heads, q_len, cols, static_cast<float>(dropout_p), stream);
  return error == nullptr ? "" : error;
}

void host_dropout_mask(uint8_t* keep, uint64_t seed, int64_t batch, int64_t q_heads, int64_t q_len, int64_t cols,
                       double dropout_p) {
  const float p = static_cast<float>(dropout_p);
  int64_t index = 0;
  for (int64_t stream = 0; stream < batch * q_heads; ++stream) {
    for (int64_t row = 0; row < q_len; ++row) {
      for (int64_t col = 0; col < cols; ++col) {
        keep[index++] = dropout_keep(seed, static_cast<uint32_t>(stream), static_cast<uint32_t>(row),
                                     static_cast<uint32_t>(col), static_cast<uint32_t>(cols), p)
                            ? 1
                            : 0;
      }
    }
  }
}

const char* compiled_arch_list() { return arch_list_string(); }

}  // namespace ptv2
