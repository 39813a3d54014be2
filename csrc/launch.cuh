// Launching a kernel from a launcher: on the GPU with its dynamic shared memory opted in, in the host simulation
// (tests/cuda_sim) by running it there.
#pragma once

#include "kernel_common.cuh"

#ifndef PTV2_SIM
#include <mutex>
#include <set>
#include <utility>
#endif

#ifdef PTV2_SIM
#define PTV2_GRID_CONSTANT
#else
#define PTV2_GRID_CONSTANT __grid_constant__
#endif

namespace ptv2 {

using KernelFn = void (*)(const Params);

// Launch `kernel` on `stream`; returns nullptr or the CUDA error message.
inline const char* launch_kernel(KernelFn kernel, dim3 grid, dim3 block, size_t smem_bytes, void* stream,
                                 const Params& p) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return nullptr;
#ifdef PTV2_SIM
  ::ptv2_sim::launch(grid, block, smem_bytes, [&] { kernel(p); });
  return nullptr;
#else
  if (smem_bytes > 48 * 1024) {
    // Above 48 KiB a kernel must opt in, once per device.
    static std::mutex mutex;
    static std::set<std::pair<const void*, int>> configured;
    int device = 0;
    cudaError_t error = cudaGetDevice(&device);
    if (error != cudaSuccess) return cudaGetErrorString(error);
    std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
    if (configured.count(key) == 0) {
      error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
      if (error != cudaSuccess) return cudaGetErrorString(error);
      configured.insert(key);
    }
  }
  kernel<<<grid, block, smem_bytes, static_cast<cudaStream_t>(stream)>>>(p);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
#endif
}

}  // namespace ptv2
