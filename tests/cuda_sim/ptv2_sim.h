// A host simulation of the CUDA execution model, enough to run the kernels of csrc/ on a CPU (tests only).
//
// The kernels compile as plain C++ with PTV2_SIM defined (csrc/kernel_common.cuh routes every CUDA-specific
// instruction here). A launch runs its blocks one after another; a block's threads run as cooperative fibers
// on one OS thread (started with ucontext, switched with _setjmp/_longjmp: build with _FORTIFY_SOURCE off, whose
// longjmp check rejects jumps between stacks), switching only at barriers, so results are deterministic. Emulated:
//   * __syncthreads / __syncthreads_or / __syncwarp, with deadlock and divergence detection;
//   * warp collectives (shuffles, ldmatrix, mma.sync.m16n8k16) through a per-warp exchange after a warp barrier,
//     implemented from the PTX ISA's fragment layouts (independently of the kernels' own index arithmetic);
//   * cp.async: copies are queued per thread and performed only when a cp.async.wait_group releases their group,
//     so a read before the wait sees stale data (or, PTV2_SIM_CP_ASYNC=early, at issue, so a load issued while
//     other threads still read the tile corrupts their reads);
//   * shared memory is filled with NaN bytes at block start and followed by a PROT_NONE guard page; ldmatrix and
//     cp.async addresses are checked for range and 16-byte alignment.
// What it cannot show: timing, races between blocks (blocks run sequentially), real tensor-core rounding (products
// are summed in float32 in k order), or compiler and hardware memory-ordering effects. Races inside a block show
// only as far as the thread order between barriers exposes them: PTV2_SIM_SCHEDULE picks it (see run_block).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <deque>
#include <functional>
#include <string>
#include <vector>

// CUDA keywords as plain C++ (cuda_runtime's host_defines turn them into attributes g++ ignores noisily).
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)



using std::max;
using std::min;

namespace ptv2_sim {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "ptv2_sim: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

enum Wait { kRunning = 0, kBlockBarrier = 1, kWarpBarrier = 2 };

struct Copy {
  void* dst;
  const void* src;
};

struct Fiber {
  ucontext_t context;  // only to start the fiber on its stack; switches use _setjmp/_longjmp (no syscalls)
  jmp_buf resume_point;
  bool started = false;
  char* stack = nullptr;
  dim3 thread_idx;
  int linear = 0, warp = 0, lane = 0;
  bool done = false;
  Wait wait = kRunning;
  unsigned collective = 0;  // warp collectives executed: all lanes of a warp stay in step
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> groups;
  int predicate = 0;
};

struct Slot {
  alignas(16) unsigned char bytes[64];
};

struct Block {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  jmp_buf scheduler;
  Fiber* current = nullptr;
  std::function<void()> body;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Slot> exchange;  // [2 buffers][warps][32 lanes]
  int n_warps = 0;
};

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}

inline Fiber& me() { return *current_block()->current; }

// ---- barriers ---------------------------------------------------------------------------------------------------

inline void wait_at(Wait kind) {
  Fiber& f = me();
  f.wait = kind;
  if (_setjmp(f.resume_point) == 0) _longjmp(current_block()->scheduler, 1);
}

inline void syncthreads() { wait_at(kBlockBarrier); }
inline void syncwarp() { wait_at(kWarpBarrier); }

inline int syncthreads_or(int predicate) {
  me().predicate = predicate != 0;
  syncthreads();
  int any = 0;
  for (const Fiber& f : current_block()->fibers) any |= f.done ? 0 : f.predicate;
  syncthreads();  // nobody overwrites a predicate before all have read
  return any;
}

// The exchange slot of (lane) for the warp's current collective; the buffer alternates between collectives so
// one warp barrier per collective suffices (see the note in warp_exchange).
inline Slot& slot(int buffer, int warp, int lane) {
  Block* b = current_block();
  return b->exchange[(static_cast<size_t>(buffer) * b->n_warps + warp) * 32 + lane];
}

// Deposit `size` bytes, wait for the whole warp, and return the buffer index where all lanes' deposits are.
// Lanes read the buffer of collective n before reaching the barrier of collective n + 1, and nobody writes that
// buffer again before collective n + 2, whose barrier needs everyone past n + 1: no second barrier needed.
inline int warp_exchange(const void* data, size_t size) {
  Fiber& f = me();
  const int buffer = static_cast<int>(f.collective++ & 1u);
  std::memcpy(slot(buffer, f.warp, f.lane).bytes, data, size);
  syncwarp();
  return buffer;
}

// ---- warp instructions --------------------------------------------------------------------------------------------

inline float shfl_xor(float x, int lane_mask) {
  const int buffer = warp_exchange(&x, sizeof(x));
  float y;
  std::memcpy(&y, slot(buffer, me().warp, me().lane ^ lane_mask).bytes, sizeof(y));
  return y;
}

inline uint32_t ballot(bool predicate) {
  const int value = predicate ? 1 : 0;
  const int buffer = warp_exchange(&value, sizeof(value));
  uint32_t bits = 0;
  for (int l = 0; l < 32; ++l) {
    int v;
    std::memcpy(&v, slot(buffer, me().warp, l).bytes, sizeof(v));
    if (v) bits |= 1u << l;
  }
  return bits;
}

inline void check_shared(const void* address, size_t bytes, const char* what) {
  Block* b = current_block();
  const unsigned char* p = static_cast<const unsigned char*>(address);
  if (p < b->smem || p + bytes > b->smem + b->smem_bytes) {
    std::fprintf(stderr, "ptv2_sim: %s address outside shared memory (offset %td of %zu)\n", what,
                 p - b->smem, b->smem_bytes);
    std::abort();
  }
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("ldmatrix/cp.async shared address not 16-byte aligned");
}

inline uint16_t element16(const void* row, int index) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * index, 2);
  return v;
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* address, bool trans) {
  check_shared(address, 16, "ldmatrix");
  const int buffer = warp_exchange(&address, sizeof(address));
  const int lane = me().lane;
  auto row_of = [&](int source_lane) {
    const void* p;
    std::memcpy(&p, slot(buffer, me().warp, source_lane).bytes, sizeof(p));
    return p;
  };
  for (int j = 0; j < 4; ++j) {
    uint32_t lo, hi;
    if (!trans) {  // row lane/4 of matrix j, elements 2(lane%4), 2(lane%4)+1
      const void* row = row_of(8 * j + lane / 4);
      lo = element16(row, 2 * (lane % 4));
      hi = element16(row, 2 * (lane % 4) + 1);
    } else {  // column lane/4 of matrix j, rows 2(lane%4), 2(lane%4)+1
      lo = element16(row_of(8 * j + 2 * (lane % 4)), lane / 4);
      hi = element16(row_of(8 * j + 2 * (lane % 4) + 1), lane / 4);
    }
    r[j] = lo | (hi << 16);
  }
}

inline float b16_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &wide, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
};

// d += A (16x16) * B (16x8) with the PTX fragment layouts, g = lane/4, t = lane%4:
// A register i (2 elements) of lane (g, t): rows g + 8 (i & 1), columns 2t + 8 (i >> 1) + {0, 1};
// B register i of lane (g, t): rows 2t + 8 i + {0, 1}, column g; C: c[i]: row g + 8 (i >> 1), column 2t + (i & 1).
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  MmaOperands mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  mine.b[0] = b0;
  mine.b[1] = b1;
  const int buffer = warp_exchange(&mine, sizeof(mine));
  auto operands = [&](int source_lane) {
    MmaOperands o;
    std::memcpy(&o, slot(buffer, me().warp, source_lane).bytes, sizeof(o));
    return o;
  };
  auto a_at = [&](int row, int col) {
    const int source = (row % 8) * 4 + (col % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
    const uint32_t word = operands(source).a[reg];
    return b16_to_float(static_cast<uint16_t>((col % 2) ? (word >> 16) : (word & 0xffffu)), bf16);
  };
  auto b_at = [&](int k, int n) {
    const int source = n * 4 + (k % 8) / 2;
    const uint32_t word = operands(source).b[k >= 8 ? 1 : 0];
    return b16_to_float(static_cast<uint16_t>((k % 2) ? (word >> 16) : (word & 0xffffu)), bf16);
  };
  const int lane = me().lane, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
    d[i] += sum;
  }
}

// ---- cp.async ----------------------------------------------------------------------------------------------------

// A copy lands at some time between its issue and its wait. PTV2_SIM_CP_ASYNC=late (default) performs it at the
// wait: reading the tile before waiting sees stale data. =early performs it at issue: overwriting a tile other
// threads still read (a missing barrier before the next load) corrupts their reads.
inline bool cp_async_early() {
  static const bool early = [] {
    const char* mode = std::getenv("PTV2_SIM_CP_ASYNC");
    return mode != nullptr && std::string(mode) == "early";
  }();
  return early;
}

inline void cp_async_16(void* dst, const void* src) {
  check_shared(dst, 16, "cp.async");
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async global address not 16-byte aligned");
  if (cp_async_early()) {
    std::memcpy(dst, src, 16);
    return;
  }
  me().open_group.push_back(Copy{dst, src});
}

inline void cp_async_commit() {
  Fiber& f = me();
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}

inline void cp_async_wait(int pending) {
  Fiber& f = me();
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const Copy& c : f.groups.front()) std::memcpy(c.dst, c.src, 16);
    f.groups.pop_front();
  }
}

// ---- launching -----------------------------------------------------------------------------------------------------

constexpr size_t kFiberStack = 512 * 1024;
constexpr size_t kMaxSharedMemory = 227 * 1024;  // the sm_90 limit; sm_80 allows 163 KiB (checked by the launchers)

inline size_t& max_shared_memory_seen() {
  static size_t bytes = 0;
  return bytes;
}

inline unsigned char* shared_memory() { return current_block()->smem; }

inline void fiber_entry() {
  Block* b = current_block();
  b->body();
  b->current->done = true;
  _longjmp(b->scheduler, 1);  // never returns: the fiber's stack is abandoned
}

// Shared memory followed by a guard page, reused across blocks of a launch.
struct GuardedBuffer {
  unsigned char* mapping = nullptr;
  size_t mapped = 0;
  unsigned char* data = nullptr;
  explicit GuardedBuffer(size_t bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t body = (bytes + page - 1) / page * page;
    mapped = body + page;
    void* m = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("mmap failed");
    mapping = static_cast<unsigned char*>(m);
    if (mprotect(mapping + body, page, PROT_NONE) != 0) fail("mprotect failed");
    data = mapping + body - (bytes + 15) / 16 * 16;
  }
  ~GuardedBuffer() { munmap(mapping, mapped); }
};

inline void run_block(Block& b) {
  const int n = static_cast<int>(b.block_dim.x * b.block_dim.y * b.block_dim.z);
  b.fibers.clear();
  b.fibers.resize(n);
  b.n_warps = (n + 31) / 32;
  b.exchange.assign(static_cast<size_t>(2) * b.n_warps * 32, Slot{});
  std::memset(b.smem, 0xff, b.smem_bytes);  // NaN in float16, bfloat16 and float32
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.thread_idx = dim3(i % b.block_dim.x, (i / b.block_dim.x) % b.block_dim.y, i / (b.block_dim.x * b.block_dim.y));
    f.warp = i / 32;
    f.lane = i % 32;
    f.stack = static_cast<char*>(std::malloc(kFiberStack));
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kFiberStack;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  // The order threads run in between barriers: PTV2_SIM_SCHEDULE=forward (default), reverse, shuffle, serial or
  // reverse-serial. A missing barrier shows only when a reader runs before its writer, or a writer overtakes a
  // reader. Without "serial", warps advance in step (one warp collective each per round); with it, only one warp
  // (the first, or the last, that can) passes its warp barriers until it reaches a block barrier, so it runs
  // ahead of the others through a whole phase: a tile it overwrites before the next __syncthreads shows.
  static const char* schedule_env = std::getenv("PTV2_SIM_SCHEDULE");
  const std::string schedule = schedule_env ? schedule_env : "forward";
  const bool reversed = schedule == "reverse" || schedule == "reverse-serial";
  const bool serial = schedule == "serial" || schedule == "reverse-serial";
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = reversed ? n - 1 - i : i;
  static uint64_t shuffle_state = 0x9E3779B97F4A7C15ull;
  for (;;) {
    if (schedule == "shuffle") {
      for (int i = n - 1; i > 0; --i) {
        shuffle_state = shuffle_state * 6364136223846793005ull + 1442695040888963407ull;
        std::swap(order[i], order[static_cast<int>((shuffle_state >> 33) % static_cast<uint64_t>(i + 1))]);
      }
    }
    for (int index : order) {
      Fiber& f = b.fibers[index];
      if (f.done || f.wait != kRunning) continue;
      b.current = &f;
      if (_setjmp(b.scheduler) == 0) {
        if (!f.started) {
          f.started = true;
          setcontext(&f.context);
        }
        _longjmp(f.resume_point, 1);
      }
    }
    bool all_done = true, any_block = false, released = false;
    for (Fiber& f : b.fibers) {
      all_done &= f.done;
      any_block |= !f.done && f.wait == kBlockBarrier;
    }
    if (all_done) break;
    // A warp barrier releases when all 32 lanes of the warp wait at it.
    for (int k = 0; k < b.n_warps && !(serial && released); ++k) {
      const int w = reversed ? b.n_warps - 1 - k : k;
      int waiting = 0, alive = 0;
      for (int l = 0; l < 32 && w * 32 + l < n; ++l) {
        const Fiber& f = b.fibers[w * 32 + l];
        alive += !f.done;
        waiting += !f.done && f.wait == kWarpBarrier;
      }
      if (waiting > 0 && waiting == alive) {
        if (alive != 32) fail("warp collective with exited lanes");
        for (int l = 0; l < 32; ++l) b.fibers[w * 32 + l].wait = kRunning;
        released = true;
      }
    }
    if (!released && any_block) {  // a block barrier releases when every live thread waits at it
      bool all_at_block = true;
      for (const Fiber& f : b.fibers) all_at_block &= f.done || f.wait == kBlockBarrier;
      if (all_at_block) {
        for (Fiber& f : b.fibers) f.wait = kRunning;
        released = true;
      }
    }
    if (!released) fail("deadlock: threads wait at different barriers (divergent __syncthreads or collective)");
  }
  for (Fiber& f : b.fibers) std::free(f.stack);
}

template <class Body>
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, Body body) {
  if (block.x * block.y * block.z > 1024) fail("more than 1024 threads per block");
  if (smem_bytes > kMaxSharedMemory) fail("dynamic shared memory above the sm_90 limit");
  if (grid.y > 65535 || grid.z > 65535) fail("grid y/z above 65535");
  if (smem_bytes > max_shared_memory_seen()) max_shared_memory_seen() = smem_bytes;
  GuardedBuffer smem(smem_bytes > 0 ? smem_bytes : 16);
  Block b;
  b.block_dim = block;
  b.grid_dim = grid;
  b.smem = smem.data;
  b.smem_bytes = smem_bytes;
  b.body = body;
  Block* previous = current_block();
  current_block() = &b;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.block_idx = dim3(x, y, z);
        run_block(b);
      }
  current_block() = previous;
}

inline const dim3& thread_idx() { return me().thread_idx; }
inline const dim3& block_idx() { return current_block()->block_idx; }
inline const dim3& block_dim() { return current_block()->block_dim; }
inline const dim3& grid_dim() { return current_block()->grid_dim; }

}  // namespace ptv2_sim

#define threadIdx (::ptv2_sim::thread_idx())
#define blockIdx (::ptv2_sim::block_idx())
#define blockDim (::ptv2_sim::block_dim())
#define gridDim (::ptv2_sim::grid_dim())
