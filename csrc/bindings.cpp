// The torch glue of the CUDA backend: tensors -> ptv2_api.h, and the registered ops.
//
// Ops (namespace ptv2_kernels_cuda; CUDA kernels, Meta shapes, and a CPU version of the dropout mask):
//   fwd(q, k, v, prefix_k, prefix_v, prefix_index?, prefix_lengths?, attn_mask?, seed?, causal, scale, dropout_p,
//       algo=0) -> (out, lse)             algo: 0 automatic, 1 tiled kernel, 2 decode kernel
//   decode(...same as fwd without algo) -> (out, lse)
//   bwd(grad_out, grad_lse?, q, k, v, prefix_k, prefix_v, prefix_index?, prefix_lengths?, attn_mask?, seed?, out,
//       lse, causal, scale, dropout_p, deterministic) -> (dq, dk, dv, dprefix_k, dprefix_v)
//   dropout_keep_mask(seed, batch, q_heads, q_len, cols, dropout_p) -> bool [B, Hq, Nq, cols]
// Arguments arrive checked and normalized by ptv2_kernels/ops.py (see ptv2_kernels/backends.py); the checks here
// guard memory safety. Plain Python functions (pybind11): arch_list(), shared_memory_bytes(dtype, head_dim).
// Only c10's CUDA headers and the CUDA runtime API: ATen/cuda/CUDAContext.h would need the cuSPARSE/cuBLAS headers,
// which a minimal CUDA toolkit lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "ptv2_api.h"

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

int32_t dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return ptv2::kFloat16;
    case at::kBFloat16: return ptv2::kBFloat16;
    case at::kFloat: return ptv2::kFloat32;
    case at::kByte:
    case at::kBool: return ptv2::kUInt8;
    case at::kInt: return ptv2::kInt32;
    case at::kLong: return ptv2::kInt64;
    default: TORCH_CHECK(false, "ptv2_kernels_cuda: unsupported dtype ", type);
  }
}

ptv2::TensorRef tensor_ref(const Tensor& t) {
  TORCH_CHECK(t.dim() <= 4, "ptv2_kernels_cuda: tensors have at most 4 dims");
  ptv2::TensorRef r;
  r.defined = true;
  r.data = t.data_ptr();
  r.dtype = dtype_code(t.scalar_type());
  r.dim = static_cast<int32_t>(t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) {
    r.size[i] = t.size(i);
    r.stride[i] = t.stride(i);
  }
  return r;
}

ptv2::TensorRef tensor_ref(const OptionalTensor& t) { return t.has_value() ? tensor_ref(*t) : ptv2::TensorRef{}; }

// Index tensors as the kernels read them: int32 or int64, contiguous (a [B] or [T] copy at most).
OptionalTensor index_tensor(const OptionalTensor& t) {
  if (!t.has_value()) return t;
  Tensor x = *t;
  if (x.scalar_type() != at::kInt && x.scalar_type() != at::kLong) x = x.to(at::kLong);
  return x.contiguous();
}

// A bool mask viewed as bytes (no copy).
OptionalTensor mask_bytes(const OptionalTensor& t) {
  if (!t.has_value()) return t;
  TORCH_CHECK(t->scalar_type() == at::kBool || t->scalar_type() == at::kByte, "attn_mask must be a bool tensor");
  return t->scalar_type() == at::kBool ? t->view(at::kByte) : *t;
}

ptv2::DeviceInfo device_info(const Tensor& q) {
  ptv2::DeviceInfo info;
  const int device = q.get_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.max_shared_memory, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return info;
}

void* current_stream(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

void check_cuda(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "ptv2_kernels_cuda: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == q.device(), "ptv2_kernels_cuda: ", name, " must be on q's device");
}

ptv2::AttentionProblem make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                                    const Tensor& prefix_v, const OptionalTensor& prefix_index,
                                    const OptionalTensor& prefix_lengths, const OptionalTensor& attn_mask,
                                    const OptionalTensor& seed, bool causal, double scale, double dropout_p) {
  check_cuda(q, "q", q);
  check_cuda(k, "k", q);
  check_cuda(v, "v", q);
  check_cuda(prefix_k, "prefix_k", q);
  check_cuda(prefix_v, "prefix_v", q);
  for (const OptionalTensor* t : {&prefix_index, &prefix_lengths, &attn_mask, &seed}) {
    if (t->has_value()) check_cuda(**t, "an optional argument", q);
  }
  TORCH_CHECK(dropout_p == 0.0 || (seed.has_value() && seed->scalar_type() == at::kLong && seed->numel() == 1),
              "ptv2_kernels_cuda: dropout needs a one-element int64 seed tensor");
  ptv2::AttentionProblem problem;
  problem.q = tensor_ref(q), problem.k = tensor_ref(k), problem.v = tensor_ref(v);
  problem.prefix_k = tensor_ref(prefix_k), problem.prefix_v = tensor_ref(prefix_v);
  problem.prefix_index = tensor_ref(prefix_index), problem.prefix_lengths = tensor_ref(prefix_lengths);
  problem.attn_mask = tensor_ref(attn_mask), problem.seed = tensor_ref(seed);
  problem.causal = causal, problem.scale = scale, problem.dropout_p = dropout_p;
  const std::string reason = ptv2::check_problem(problem);
  TORCH_CHECK(reason.empty(), "ptv2_kernels_cuda: ", reason);
  return problem;
}

std::tuple<Tensor, Tensor> forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                                        const Tensor& prefix_v, const OptionalTensor& prefix_index_in,
                                        const OptionalTensor& prefix_lengths_in, const OptionalTensor& attn_mask_in,
                                        const OptionalTensor& seed, bool causal, double scale, double dropout_p,
                                        int64_t algo) {
  TORCH_CHECK(algo >= 0 && algo <= 2, "ptv2_kernels_cuda.fwd: algo must be 0, 1 or 2");
  const c10::cuda::CUDAGuard guard(q.device());
  const OptionalTensor prefix_index = index_tensor(prefix_index_in), prefix_lengths = index_tensor(prefix_lengths_in);
  const OptionalTensor attn_mask = mask_bytes(attn_mask_in);
  const ptv2::AttentionProblem problem = make_problem(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                                      attn_mask, seed, causal, scale, dropout_p);
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2), dim = q.size(3);
  Tensor out = at::empty({batch, length, heads, dim}, q.options()).transpose(1, 2);
  Tensor lse = at::empty({batch, heads, length}, q.options().dtype(at::kFloat));
  const ptv2::DeviceInfo device = device_info(q);
  const auto forward_algo = static_cast<ptv2::ForwardAlgo>(algo);
  const size_t bytes = ptv2::forward_workspace_bytes(problem, forward_algo, device);
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
  const std::string error =
      ptv2::run_forward(problem, ptv2::ForwardOutputs{tensor_ref(out), tensor_ref(lse)}, forward_algo, workspace.data_ptr(), bytes,
                        device, current_stream(q));
  TORCH_CHECK(error.empty(), "ptv2_kernels_cuda.fwd: ", error);
  return {out, lse};
}

std::tuple<Tensor, Tensor> decode_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                                       const Tensor& prefix_v, const OptionalTensor& prefix_index,
                                       const OptionalTensor& prefix_lengths, const OptionalTensor& attn_mask,
                                       const OptionalTensor& seed, bool causal, double scale, double dropout_p) {
  return forward_impl(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_mask, seed, causal, scale,
                      dropout_p, ptv2::kForwardDecode);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Tensor& grad_out_in, const OptionalTensor& grad_lse, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& prefix_k, const Tensor& prefix_v, const OptionalTensor& prefix_index_in,
    const OptionalTensor& prefix_lengths_in, const OptionalTensor& attn_mask_in, const OptionalTensor& seed,
    const Tensor& out, const Tensor& lse_in, bool causal, double scale, double dropout_p, bool deterministic) {
  const c10::cuda::CUDAGuard guard(q.device());
  const OptionalTensor prefix_index = index_tensor(prefix_index_in), prefix_lengths = index_tensor(prefix_lengths_in);
  const OptionalTensor attn_mask = mask_bytes(attn_mask_in);
  const ptv2::AttentionProblem problem = make_problem(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                                      attn_mask, seed, causal, scale, dropout_p);
  check_cuda(grad_out_in, "grad_out", q);
  check_cuda(out, "out", q);
  check_cuda(lse_in, "lse", q);
  TORCH_CHECK(out.sizes() == q.sizes() && grad_out_in.sizes() == q.sizes(), "out and grad_out must have q's shape");
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == q.size(0) && lse_in.size(1) == q.size(1) &&
                  lse_in.size(2) == q.size(2),
              "lse must be [B, Hq, Nq]");
  const Tensor grad_out = grad_out_in.scalar_type() == q.scalar_type() ? grad_out_in : grad_out_in.to(q.scalar_type());
  const Tensor lse = lse_in.to(at::kFloat).contiguous();
  OptionalTensor dlse = grad_lse;
  if (dlse.has_value()) {
    check_cuda(*dlse, "grad_lse", q);
    TORCH_CHECK(dlse->sizes() == lse.sizes(), "grad_lse must be [B, Hq, Nq]");
    if (dlse->scalar_type() != at::kFloat) dlse = dlse->to(at::kFloat);
  }
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  Tensor dprefix_k = at::empty_like(prefix_k), dprefix_v = at::empty_like(prefix_v);
  ptv2::BackwardInputs inputs;
  inputs.grad_out = tensor_ref(grad_out), inputs.grad_lse = tensor_ref(dlse), inputs.out = tensor_ref(out), inputs.lse = tensor_ref(lse);
  inputs.deterministic = deterministic;
  const ptv2::BackwardOutputs outputs{tensor_ref(dq), tensor_ref(dk), tensor_ref(dv), tensor_ref(dprefix_k), tensor_ref(dprefix_v)};
  const size_t bytes = ptv2::backward_workspace_bytes(problem, inputs);
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
  const std::string error = ptv2::run_backward(problem, inputs, outputs, workspace.data_ptr(), bytes, device_info(q),
                                               current_stream(q));
  TORCH_CHECK(error.empty(), "ptv2_kernels_cuda.bwd: ", error);
  return {dq, dk, dv, dprefix_k, dprefix_v};
}

Tensor dropout_mask_cuda(const Tensor& seed, int64_t batch, int64_t q_heads, int64_t q_len, int64_t cols,
                         double dropout_p) {
  TORCH_CHECK(seed.is_cuda() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "seed must be a one-element int64 CUDA tensor");
  const c10::cuda::CUDAGuard guard(seed.device());
  Tensor keep = at::empty({batch, q_heads, q_len, cols}, seed.options().dtype(at::kByte));
  const std::string error =
      ptv2::run_dropout_mask(keep.data_ptr<uint8_t>(), seed.data_ptr<int64_t>(), batch, q_heads, q_len, cols, dropout_p,
                             current_stream(seed));
  TORCH_CHECK(error.empty(), "ptv2_kernels_cuda.dropout_keep_mask: ", error);
  return keep.to(at::kBool);
}

Tensor dropout_mask_cpu(const Tensor& seed, int64_t batch, int64_t q_heads, int64_t q_len, int64_t cols,
                        double dropout_p) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, "seed must be a one-element int64 tensor");
  Tensor keep = at::empty({batch, q_heads, q_len, cols}, seed.options().dtype(at::kByte));
  ptv2::host_dropout_mask(keep.data_ptr<uint8_t>(), static_cast<uint64_t>(seed.item<int64_t>()), batch, q_heads, q_len,
                          cols, dropout_p);
  return keep.to(at::kBool);
}

// ---- shapes without data (Meta) -------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> forward_meta(const Tensor& q, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                        const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                                        const OptionalTensor&, bool, double, double, int64_t) {
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2), dim = q.size(3);
  return {at::empty({batch, length, heads, dim}, q.options()).transpose(1, 2),
          at::empty({batch, heads, length}, q.options().dtype(at::kFloat))};
}

std::tuple<Tensor, Tensor> decode_meta(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                                       const Tensor& prefix_v, const OptionalTensor& a, const OptionalTensor& b,
                                       const OptionalTensor& c, const OptionalTensor& d, bool causal, double scale,
                                       double dropout_p) {
  return forward_meta(q, k, v, prefix_k, prefix_v, a, b, c, d, causal, scale, dropout_p, 2);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_meta(
    const Tensor&, const OptionalTensor&, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
    const Tensor& prefix_v, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const Tensor&, const Tensor&, bool, double, double, bool) {
  return {at::empty_like(q), at::empty_like(k), at::empty_like(v), at::empty_like(prefix_k), at::empty_like(prefix_v)};
}

Tensor dropout_mask_meta(const Tensor& seed, int64_t batch, int64_t q_heads, int64_t q_len, int64_t cols, double) {
  return at::empty({batch, q_heads, q_len, cols}, seed.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY(ptv2_kernels_cuda, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? prefix_index, "
      "Tensor? prefix_lengths, Tensor? attn_mask, Tensor? seed, bool causal, float scale, float dropout_p, "
      "int algo=0) -> (Tensor, Tensor)");
  m.def(
      "decode(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? prefix_index, "
      "Tensor? prefix_lengths, Tensor? attn_mask, Tensor? seed, bool causal, float scale, float dropout_p) "
      "-> (Tensor, Tensor)");
  m.def(
      "bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? prefix_index, Tensor? prefix_lengths, Tensor? attn_mask, Tensor? seed, Tensor out, Tensor lse, "
      "bool causal, float scale, float dropout_p, bool deterministic) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dropout_keep_mask(Tensor seed, int batch, int q_heads, int q_len, int cols, float dropout_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(ptv2_kernels_cuda, CUDA, m) {
  m.impl("fwd", &forward_impl);
  m.impl("decode", &decode_impl);
  m.impl("bwd", &backward_impl);
  m.impl("dropout_keep_mask", &dropout_mask_cuda);
}

TORCH_LIBRARY_IMPL(ptv2_kernels_cuda, CPU, m) { m.impl("dropout_keep_mask", &dropout_mask_cpu); }

TORCH_LIBRARY_IMPL(ptv2_kernels_cuda, Meta, m) {
  m.impl("fwd", &forward_meta);
  m.impl("decode", &decode_meta);
  m.impl("bwd", &backward_meta);
  m.impl("dropout_keep_mask", &dropout_mask_meta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ptv2_kernels' CUDA kernels; the ops are registered as torch.ops.ptv2_kernels_cuda.*";
  m.def("arch_list", []() { return std::string(ptv2::compiled_arch_list()); },
        "The CUDA architectures the kernels were compiled for, as nvcc's __CUDA_ARCH_LIST__ (e.g. '800,900').");
  m.def(
      "shared_memory_bytes",
      [](const std::string& dtype, int64_t head_dim) {
        const int code = dtype == "float32" ? ptv2::kFloat32 : (dtype == "bfloat16" ? ptv2::kBFloat16 : ptv2::kFloat16);
        return ptv2::shared_memory_bytes(code, static_cast<int>(head_dim));
      },
      "Dynamic shared memory per block (bytes) the kernels for q/k/v of this dtype and head dim need at most.");
  m.def(
      "limits",
      []() {
        pybind11::dict limits;
        limits["max_head_dim"] = ptv2::kMaxHeadDim;
        limits["max_grid_dim"] = ptv2::kMaxGridDim;
        limits["size_bits"] = ptv2::kSizeBits;
        limits["max_decode_queries"] = ptv2::kMaxDecodeQueries;
        return limits;
      },
      "What the kernels serve: the largest head dim, samples/query heads per grid dim, the bits every size and "
      "(with dropout) Nq * (P + Nk) must fit in, and the most queries of the decode kernel.");
}
