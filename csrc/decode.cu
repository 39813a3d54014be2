// Decode (Nq <= 16, float16/bfloat16): split-KV over the prefix and the sequence, then a combine step.
//
// Each query row gets n_pchunks prefix slots and n_splits sequence slots of partial results (the unnormalized
// output, the running max in log2 units and the sum of probabilities); the combine kernel merges a row's slots
// into its output and lse. Work items of the split kernel:
//   * sequence items (sample, kv head, 16-row tile of the group's query rows, key split): the query heads of a GQA
//     group are folded into the rows (group * Nq rows share the sample's K/V), the 4 warps take interleaved
//     sub-tiles of each key tile, and their states are merged through shared memory;
//   * prefix items (sample, kv head, prefix chunk): only the first sample of each bank entry works, for every sample
//     that uses the entry: their (sample, head, query) rows are stacked into one query dimension, so the chunk is
//     read once per bank entry (cascade attention's shared-prefix step), not once per sample.
#include "attention_tile.cuh"
#include "launch.cuh"

namespace ptv2 {

// One warp: the online-softmax update of its 16 rows (Q in `q_tile`) with the kSub keys at rows key_row0.. of the
// K/V tiles.
template <typename T, int kD, int NT, class Visible, class Keep>
PTV2_DEVICE void attend_subtile(float (&o)[kD / 8][4], float (&row_max)[2], float (&row_sum)[2], const T* q_tile,
                                const T* s_k, const T* s_v, int key_row0, const Params& p, int d_steps,
                                bool need_mask, Visible visible, Keep keep, int lane) {
  float s[1][NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) s[0][nt][0] = s[0][nt][1] = s[0][nt][2] = s[0][nt][3] = 0.f;
  warp_mma<T, 1, NT, kD, false, kD, false>(s, q_tile, 0, 0, s_k, key_row0, 0, d_steps, NT / 2, lane);
  float alpha[2];
  online_softmax<NT>(s[0], row_max, row_sum, alpha, p.qk_scale_log2, need_mask, visible, p.has_dropout, keep, lane);
  rescale_rows<kD / 8>(o, alpha);
  warp_mma_regs_a<T, NT, kD / 8, kD>(o, s[0], s_v, key_row0, d_steps, lane);
}

// A query row of a (sample, kv head)'s stacked group * Nq rows.
struct DecodeRow {
  bool valid;
  int h, i;
};

PTV2_DEVICE DecodeRow decode_row(const Params& p, int hkv, int local_row) {
  DecodeRow r;
  r.valid = local_row < p.group * p.q_len;
  const int g = r.valid ? local_row / p.q_len : 0;
  r.i = r.valid ? local_row % p.q_len : 0;
  r.h = hkv * p.group + g;
  return r;
}

PTV2_DEVICE int64_t row_index(const Params& p, int64_t b, int h, int i) {
  return (b * p.q_heads + h) * p.q_len + i;
}

template <typename T, int kD>
PTV2_DEVICE void decode_sequence_item(const Params& p, unsigned char* smem, int item) {
  constexpr int kSub = decode_sub_keys(kD), kChunk = decode_chunk_keys(kD), NT = kSub / 8, DT = kD / 8;
  constexpr int kWarps = kDecodeWarps, kThreads = kWarps * 32;
  T* s_k = reinterpret_cast<T*>(smem);
  T* s_v = s_k + kChunk * kD;
  T* s_q = s_v + kChunk * kD;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int hd = p.head_dim, d_steps = ceil_div(hd, 16), d_chunks = 2 * d_steps;

  int rest = item;
  const int split = rest % p.n_splits;
  rest /= p.n_splits;
  const int tile = rest % p.n_rowtiles;
  rest /= p.n_rowtiles;
  const int hkv = rest % p.kv_heads;
  const int64_t b = rest / p.kv_heads;

  // The tile's 16 query rows (of the group * Nq rows of (b, hkv)), shared by the 4 warps.
  const RowSource q_src{p.q, p.q_sm, 1, p.dtype, p.q_vec};
  for (int i = tid; i < 16 * (kD / 8); i += kThreads) {
    const int r = i / (kD / 8), c = i % (kD / 8);
    if (c >= d_chunks) continue;
    const DecodeRow row = decode_row(p, hkv, tile * 16 + r);
    const void* ptr = row.valid ? offset_ptr(p.q, b * p.q_sb + row.h * p.q_sh + row.i * p.q_sm, p.dtype) : nullptr;
    load_chunk(s_q + swizzle<kD>(r, c), ptr, q_src, c * 8, hd);
  }

  // This thread's two rows.
  DecodeRow rows[2];
  SeqMask masks[2];
  uint32_t streams[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    rows[half] = decode_row(p, hkv, tile * 16 + lane / 4 + 8 * half);
    masks[half] = seq_mask(p, b, rows[half].h);
    streams[half] = static_cast<uint32_t>(b * p.q_heads + rows[half].h);
  }
  const uint64_t seed = load_seed(p);
  const uint32_t cols_total = static_cast<uint32_t>(p.prefix_len + p.k_len);

  const RowSource k_src{offset_ptr(p.k, b * p.k_sb + hkv * p.k_sh, p.dtype), p.k_sn, 1, p.dtype, p.k_vec};
  const RowSource v_src{offset_ptr(p.v, b * p.v_sb + hkv * p.v_sh, p.dtype), p.v_sn, 1, p.dtype, p.v_vec};
  const int k_begin = split * p.keys_per_split;
  const int k_end = min(k_begin + p.keys_per_split, p.k_len);

  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  for (int t0 = k_begin; t0 < k_end; t0 += kChunk) {
    load_tile<T, kChunk, kD>(s_k, k_src, t0, k_end, hd, d_chunks, tid, kThreads);
    load_tile<T, kChunk, kD>(s_v, v_src, t0, k_end, hd, d_chunks, tid, kThreads);
    cp_async_commit();
    cp_async_wait<0>();
    sync_block();
    const int sub0 = t0 + warp * kSub;
    if (sub0 < k_end) {
      const bool need_mask = sub0 + kSub > k_end || p.causal || p.key_pad != nullptr || p.dense != nullptr;
      auto visible = [&](int half, int col) { return seq_visible(p, masks[half], rows[half].i, sub0 + col); };
      auto keep = [&](int half, int col) {
        return dropout_keep(seed, streams[half], static_cast<uint32_t>(rows[half].i),
                            static_cast<uint32_t>(p.prefix_len + sub0 + col), cols_total, p.dropout_p);
      };
      attend_subtile<T, kD, NT>(o, row_max, row_sum, s_q, s_k, s_v, warp * kSub, p, d_steps, need_mask, visible,
                                keep, lane);
    }
    sync_block();
  }

  // Merge the 4 warps' states through shared memory (reusing the tiles) into this item's slot.
  float* s_o = reinterpret_cast<float*>(smem);  // [kWarps][16][kD]
  float* s_ml = s_o + kWarps * 16 * kD;         // [kWarps][16][2]
  const int t = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = lane / 4 + 8 * half;
    const float sum = quad_sum(row_sum[half]);
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      s_o[(warp * 16 + r) * kD + dt * 8 + 2 * t] = o[dt][2 * half];
      s_o[(warp * 16 + r) * kD + dt * 8 + 2 * t + 1] = o[dt][2 * half + 1];
    }
    if (t == 0) {
      s_ml[(warp * 16 + r) * 2] = row_max[half];
      s_ml[(warp * 16 + r) * 2 + 1] = sum;
    }
  }
  sync_block();
  const int64_t rows_total = static_cast<int64_t>(p.batch) * p.q_heads * p.q_len;
  const int64_t slot = p.n_pchunks + split;
  for (int i = tid; i < 16 * hd; i += kThreads) {
    const int r = i / hd, d = i % hd;
    const DecodeRow row = decode_row(p, hkv, tile * 16 + r);
    if (!row.valid) continue;
    float m = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, s_ml[(w * 16 + r) * 2]);
    const float shift = m == -INFINITY ? 0.f : m;
    float acc = 0.f, sum = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float factor = exp2f(s_ml[(w * 16 + r) * 2] - shift);
      acc += factor * s_o[(w * 16 + r) * kD + d];
      sum += factor * s_ml[(w * 16 + r) * 2 + 1];
    }
    const int64_t out_row = slot * rows_total + row_index(p, b, row.h, row.i);
    p.part_o[out_row * hd + d] = acc;
    if (d == 0) {
      p.part_ml[out_row * 2] = m;
      p.part_ml[out_row * 2 + 1] = sum;
    }
  }
}

PTV2_DEVICE int64_t sample_entry(const Params& p, int64_t b) {
  if (p.prefix_index == nullptr) return 0;
  return p.index_64 ? static_cast<const int64_t*>(p.prefix_index)[b]
                    : static_cast<int64_t>(static_cast<const int32_t*>(p.prefix_index)[b]);
}

template <typename T, int kD>
PTV2_DEVICE void decode_prefix_item(const Params& p, unsigned char* smem, int item) {
  constexpr int kSub = decode_sub_keys(kD), kChunk = decode_chunk_keys(kD), NT = kSub / 8, DT = kD / 8;
  constexpr int kWarps = kDecodeWarps, kThreads = kWarps * 32;
  T* s_k = reinterpret_cast<T*>(smem);
  T* s_v = s_k + kChunk * kD;
  T* s_q = s_v + kChunk * kD;
  int* s_run = reinterpret_cast<int*>(s_q + kWarps * 16 * kD);
  int* s_counts = s_run + kDecodeRunCapacity;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int hd = p.head_dim, d_steps = ceil_div(hd, 16), d_chunks = 2 * d_steps;

  const int pc = item % p.n_pchunks;
  const int hkv = (item / p.n_pchunks) % p.kv_heads;
  const int64_t b = item / p.n_pchunks / p.kv_heads;
  const BankEntry bank = bank_entry(p, b);
  const int key0 = pc * kChunk;
  if (!bank.index_ok || key0 >= bank.keys) return;
  // Only the first sample using this bank entry works.
  bool earlier = false;
  for (int64_t other = tid; other < b; other += kThreads) earlier |= sample_entry(p, other) == bank.entry;
  if (sync_block_or(earlier)) return;

  const int key_end = min(key0 + kChunk, bank.keys);
  const RowSource pk_src{offset_ptr(p.pk, bank.entry * p.pk_st + hkv * p.pk_sh, p.prefix_dtype), p.pk_sn, p.pk_sd,
                         p.prefix_dtype, p.pk_vec};
  const RowSource pv_src{offset_ptr(p.pv, bank.entry * p.pv_st + hkv * p.pv_sh, p.prefix_dtype), p.pv_sn, p.pv_sd,
                         p.prefix_dtype, p.pv_vec};
  load_tile<T, kChunk, kD>(s_k, pk_src, key0, key_end, hd, d_chunks, tid, kThreads);
  load_tile<T, kChunk, kD>(s_v, pv_src, key0, key_end, hd, d_chunks, tid, kThreads);
  cp_async_commit();
  cp_async_wait<0>();
  sync_block();

  const RowSource q_src{p.q, p.q_sm, 1, p.dtype, p.q_vec};
  const int rows_per_sample = p.group * p.q_len;
  const int64_t rows_total = static_cast<int64_t>(p.batch) * p.q_heads * p.q_len;
  const uint64_t seed = load_seed(p);
  const uint32_t cols_total = static_cast<uint32_t>(p.prefix_len + p.k_len);
  T* q_tile = s_q + warp * 16 * kD;

  // The samples using the entry, kDecodeRunCapacity candidates at a time, compacted in sample order.
  for (int64_t first = b; first < p.batch; first += kThreads) {
    const int64_t candidate = first + tid;
    const bool member = candidate < p.batch && sample_entry(p, candidate) == bank.entry;
    const uint32_t votes = ballot(member);
    if (lane == 0) s_counts[warp] = popcount(votes);
    sync_block();
    int offset = 0, n = 0;
    for (int w = 0; w < kWarps; ++w) {
      offset += w < warp ? s_counts[w] : 0;
      n += s_counts[w];
    }
    if (member) s_run[offset + popcount(votes & ((1u << lane) - 1u))] = static_cast<int>(candidate);
    sync_block();

    const int rows = n * rows_per_sample;
    for (int tile = warp; tile * 16 < rows; tile += kWarps) {
      // Gather the tile's 16 rows (sample, head, query) into this warp's Q tile.
      for (int i = lane; i < 16 * (kD / 8); i += 32) {
        const int r = i / (kD / 8), c = i % (kD / 8);
        if (c >= d_chunks) continue;
        const int local = tile * 16 + r;
        const void* ptr = nullptr;
        if (local < rows) {
          const int64_t sample = s_run[local / rows_per_sample];
          const DecodeRow row = decode_row(p, hkv, local % rows_per_sample);
          ptr = offset_ptr(p.q, sample * p.q_sb + row.h * p.q_sh + row.i * p.q_sm, p.dtype);
        }
        load_chunk(q_tile + swizzle<kD>(r, c), ptr, q_src, c * 8, hd);
      }
      cp_async_commit();
      cp_async_wait<0>();
      sync_warp();

      int64_t samples[2];
      DecodeRow my_rows[2];
      uint32_t streams[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int local = tile * 16 + lane / 4 + 8 * half;
        const bool valid = local < rows;
        samples[half] = valid ? s_run[local / rows_per_sample] : 0;
        my_rows[half] = decode_row(p, hkv, valid ? local % rows_per_sample : 0);
        my_rows[half].valid = valid;
        streams[half] = static_cast<uint32_t>(samples[half] * p.q_heads + my_rows[half].h);
      }

      float o[DT][4];
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
      float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
      for (int sub = 0; sub < kWarps; ++sub) {
        const int sub0 = key0 + sub * kSub;
        if (sub0 >= key_end) break;
        auto visible = [&](int, int col) { return sub0 + col < key_end; };
        auto keep = [&](int half, int col) {
          return dropout_keep(seed, streams[half], static_cast<uint32_t>(my_rows[half].i),
                              static_cast<uint32_t>(sub0 + col), cols_total, p.dropout_p);
        };
        attend_subtile<T, kD, NT>(o, row_max, row_sum, q_tile, s_k, s_v, sub * kSub, p, d_steps,
                                  sub0 + kSub > key_end, visible, keep, lane);
      }

      const int t = lane & 3;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float sum = quad_sum(row_sum[half]);
        if (!my_rows[half].valid) continue;
        const int64_t out_row = pc * rows_total + row_index(p, samples[half], my_rows[half].h, my_rows[half].i);
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          const int col = dt * 8 + 2 * t;
          if (col < hd) p.part_o[out_row * hd + col] = o[dt][2 * half];
          if (col + 1 < hd) p.part_o[out_row * hd + col + 1] = o[dt][2 * half + 1];
        }
        if (t == 0) {
          p.part_ml[out_row * 2] = row_max[half];
          p.part_ml[out_row * 2 + 1] = sum;
        }
      }
      sync_warp();  // the warp is done with its Q tile before the next gather
    }
    sync_block();  // s_run and s_counts are rewritten next round
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(128, 1) decode_split_kernel(const PTV2_GRID_CONSTANT Params p) {
  PTV2_SHARED_MEMORY(smem);
  // Prefix items first: few of them work (one per bank entry), but each for many rows; launched last they would
  // lengthen the tail.
  const int item = blockIdx.x;
  if (item < p.n_prefix_items) {
    decode_prefix_item<T, kD>(p, smem, item);
  } else {
    decode_sequence_item<T, kD>(p, smem, item - p.n_prefix_items);
  }
}

// One warp per query row: merge its prefix slots (those its bank entry's length fills) and sequence slots.
template <typename T>
__global__ void __launch_bounds__(128) decode_combine_kernel(const PTV2_GRID_CONSTANT Params p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows_total = static_cast<int64_t>(p.batch) * p.q_heads * p.q_len;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (row >= rows_total) return;
  const int i = static_cast<int>(row % p.q_len);
  const int h = static_cast<int>((row / p.q_len) % p.q_heads);
  const int64_t b = row / p.q_len / p.q_heads;
  const BankEntry bank = bank_entry(p, b);
  const int prefix_slots = ceil_div(bank.keys, p.decode_chunk);
  const int n_slots = p.n_pchunks + p.n_splits;

  float m = -INFINITY;
  for (int s = 0; s < n_slots; ++s) {
    if (s >= prefix_slots && s < p.n_pchunks) continue;
    m = fmaxf(m, p.part_ml[(s * rows_total + row) * 2]);
  }
  const float shift = m == -INFINITY ? 0.f : m;
  float sum = 0.f;
  for (int s = 0; s < n_slots; ++s) {
    if (s >= prefix_slots && s < p.n_pchunks) continue;
    sum += exp2f(p.part_ml[(s * rows_total + row) * 2] - shift) * p.part_ml[(s * rows_total + row) * 2 + 1];
  }
  const float denominator = sum > 0.f ? sum : 1.f;
  T* out_row = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + static_cast<int64_t>(i) * p.o_sm;
  for (int d = lane; d < p.head_dim; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < n_slots; ++s) {
      if (s >= prefix_slots && s < p.n_pchunks) continue;
      acc += exp2f(p.part_ml[(s * rows_total + row) * 2] - shift) * p.part_o[(s * rows_total + row) * p.head_dim + d];
    }
    float value = acc / denominator * p.dropout_scale;
    if (!bank.index_ok) value = NAN;
    out_row[d] = from_float<T>(value);
  }
  if (lane == 0) p.lse[row] = sum > 0.f ? (m + log2f(sum)) * kLn2 : -INFINITY;
}

template <typename T, int kD>
static const char* launch_decode(const Params& p, void* stream) {
  const int64_t items = static_cast<int64_t>(p.n_seq_items) + p.n_prefix_items;
  if (items > 0) {
    const char* error =
        launch_kernel(decode_split_kernel<T, kD>, dim3(static_cast<unsigned>(items)), dim3(128),
                      decode_smem_bytes(kD), stream, p);
    if (error != nullptr) return error;
  }
  const int64_t rows_total = static_cast<int64_t>(p.batch) * p.q_heads * p.q_len;
  return launch_kernel(decode_combine_kernel<T>, dim3(static_cast<unsigned>((rows_total + 3) / 4)), dim3(128), 0,
                       stream, p);
}

const char* launch_forward_decode(const Params& p, void* stream) {
  if (!is_16bit(p.dtype)) return "the decode kernel serves float16 and bfloat16 inputs only";
  return dispatch_16bit(p, [&](auto type, auto dim) {
    return launch_decode<typename decltype(type)::type, decltype(dim)::value>(p, stream);
  });
}

}  // namespace ptv2
