// The dropout keep mask as a tensor (a testing aid: the same bits the attention kernels draw), a memset on the
// stream, and the list of architectures this file was compiled for.
#include "kernel_common.cuh"

#ifdef PTV2_SIM
#include <cstring>
#endif

#define PTV2_STRINGIFY_(...) #__VA_ARGS__
#define PTV2_STRINGIFY(...) PTV2_STRINGIFY_(__VA_ARGS__)

namespace ptv2 {

__global__ void __launch_bounds__(256) dropout_mask_kernel(uint8_t* keep, const int64_t* seed, int64_t total,
                                                          int64_t q_len, int64_t cols, float dropout_p) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const int64_t col = index % cols;
  const int64_t row = (index / cols) % q_len;
  const int64_t stream = index / cols / q_len;
  keep[index] = dropout_keep(static_cast<uint64_t>(*seed), static_cast<uint32_t>(stream), static_cast<uint32_t>(row),
                             static_cast<uint32_t>(col), static_cast<uint32_t>(cols), dropout_p)
                    ? 1
                    : 0;
}

const char* launch_dropout_mask_kernel(uint8_t* keep, const int64_t* seed, int64_t batch, int64_t q_heads,
                                       int64_t q_len, int64_t cols, float dropout_p, void* stream) {
  const int64_t total = batch * q_heads * q_len * cols;
  if (total == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>((total + 255) / 256));
#ifdef PTV2_SIM
  ::ptv2_sim::launch(grid, dim3(256), 0, [&] { dropout_mask_kernel(keep, seed, total, q_len, cols, dropout_p); });
  (void)stream;
  return nullptr;
#else
  dropout_mask_kernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(keep, seed, total, q_len, cols, dropout_p);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
#endif
}

const char* memset_async(void* ptr, int value, size_t bytes, void* stream) {
  if (bytes == 0) return nullptr;
#ifdef PTV2_SIM
  std::memset(ptr, value, bytes);
  (void)stream;
  return nullptr;
#else
  const cudaError_t error = cudaMemsetAsync(ptr, value, bytes, static_cast<cudaStream_t>(stream));
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
#endif
}

const char* arch_list_string() {
#if defined(__CUDA_ARCH_LIST__)
  return PTV2_STRINGIFY(__CUDA_ARCH_LIST__);
#elif defined(PTV2_SIM)
  return "sim";
#else
  return "unknown";
#endif
}

}  // namespace ptv2
