// The torch-free interface of the CUDA kernels of prefix_attention.
//
// Everything the binding (bindings.cpp) needs, and nothing of torch: tensors are described by TensorRef (pointer,
// dtype, sizes, strides in elements), outputs and workspace are allocated by the caller, the stream is a plain
// pointer (a cudaStream_t). api.cpp implements it on top of the kernel launchers (params.h, *.cu).
//
// The semantics are the op's (docs/design.md §4). Arguments arrive already checked and normalized by
// ptv2_kernels/ops.py (a 4-D prefix bank; a mask either [B, Nk] or a dense mask expanded, as a view, to
// [B, Hq, Nq, Nk]); check_problem() repeats the checks the kernels' memory safety depends on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ptv2 {

enum DType : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kUInt8 = 3, kInt32 = 4, kInt64 = 5 };

// A strided view of up to 4 dims. `defined` is false for an absent optional argument.
struct TensorRef {
  bool defined = false;
  void* data = nullptr;
  int32_t dtype = kFloat32;
  int32_t dim = 0;
  int64_t size[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};
};

struct AttentionProblem {
  TensorRef q, k, v;                    // [B, Hq, Nq, D], [B, Hkv, Nk, D] x2; any strides, last dim contiguous
  TensorRef prefix_k, prefix_v;         // [T, Hkv, P, D], any strides, dtype float16/bfloat16/float32
  TensorRef prefix_index;               // optional [B] int32/int64
  TensorRef prefix_lengths;             // optional [T] int32/int64
  TensorRef attn_mask;                  // optional uint8 (bool): [B, Nk] key padding or [B, Hq, Nq, Nk] dense
  TensorRef seed;                       // int64 scalar on the device; required when dropout_p > 0
  bool causal = false;
  double scale = 1.0;
  double dropout_p = 0.0;
};

// Which forward kernel: the tiled one (any Nq), the split-KV decode kernel (Nq <= kMaxDecodeQueries, float16 /
// bfloat16), or automatic (decode for small Nq where it applies).
enum ForwardAlgo : int32_t { kForwardAuto = 0, kForwardTiled = 1, kForwardDecode = 2 };
constexpr int kMaxDecodeQueries = 16;

// What the kernels serve, stated once: api.cpp's checks use these, and the extension reports them to Python
// (limits() in bindings.cpp), whose backend reads them instead of repeating them.
constexpr int64_t kMaxHeadDim = 256;      // head dims are dispatched to tiles of 32, 64, 128 or 256
constexpr int64_t kMaxGridDim = 65535;    // samples and query heads: the grid's second and third dims
constexpr int kSizeBits = 31;             // every length, B * Hq * Nq, and with dropout Nq * (P + Nk) < 2**31

struct DeviceInfo {
  int num_sms = 1;
  int max_shared_memory = 48 * 1024;  // opt-in dynamic shared memory per block, bytes
};

struct ForwardOutputs {
  TensorRef out;  // [B, Hq, Nq, D], q's dtype, last dim contiguous
  TensorRef lse;  // [B, Hq, Nq] float32, contiguous
};

struct BackwardInputs {
  TensorRef grad_out;  // [B, Hq, Nq, D], q's dtype, any strides
  TensorRef grad_lse;  // optional [B, Hq, Nq] float32, any strides
  TensorRef out;       // the forward's outputs
  TensorRef lse;       // contiguous float32
  bool deterministic = false;
};

struct BackwardOutputs {
  TensorRef dq, dk, dv;            // q/k/v's dtype, any strides
  TensorRef dprefix_k, dprefix_v;  // the prefix's dtype, any strides
};

// "" if the kernels can serve this problem, else a sentence saying why not.
std::string check_problem(const AttentionProblem& problem);
// The algorithm kForwardAuto resolves to for this problem (kForwardTiled or kForwardDecode).
ForwardAlgo resolve_forward_algo(const AttentionProblem& problem, ForwardAlgo algo);

size_t forward_workspace_bytes(const AttentionProblem& problem, ForwardAlgo algo, const DeviceInfo& device);
// Returns "" on success, else an error message (nothing is thrown).
std::string run_forward(const AttentionProblem& problem, const ForwardOutputs& outputs, ForwardAlgo algo,
                        void* workspace, size_t workspace_bytes, const DeviceInfo& device, void* stream);

size_t backward_workspace_bytes(const AttentionProblem& problem, const BackwardInputs& inputs);
std::string run_backward(const AttentionProblem& problem, const BackwardInputs& inputs,
                         const BackwardOutputs& outputs, void* workspace, size_t workspace_bytes,
                         const DeviceInfo& device, void* stream);

// keep[b, h, i, c] (uint8, contiguous [B, Hq, Nq, cols]) of the dropout mask the kernels draw from *seed.
std::string run_dropout_mask(uint8_t* keep, const int64_t* seed, int64_t batch, int64_t q_heads, int64_t q_len,
                             int64_t cols, double dropout_p, void* stream);
// The same mask computed on the host (seed given by value).
void host_dropout_mask(uint8_t* keep, uint64_t seed, int64_t batch, int64_t q_heads, int64_t q_len, int64_t cols,
                       double dropout_p);

// The most dynamic shared memory per block (bytes) the kernels serving q/k/v of this dtype and head dim use.
int64_t shared_memory_bytes(int dtype, int head_dim);

// The CUDA architectures the kernels were compiled for, as nvcc's __CUDA_ARCH_LIST__ (e.g. "800,900").
const char* compiled_arch_list();

}  // namespace ptv2
