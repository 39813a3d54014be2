// The online-softmax step a warp applies to its 16-row score tile, shared by the tiled forward and the decode
// kernel, and the epilogue of a warp's rows.
#pragma once

#include "kernel_common.cuh"

namespace ptv2 {

// One online-softmax update of a warp's score tile s (16 rows x 8 NT columns as C fragments: element i of n8 tile
// nt is row half (i >> 1) (rows g, g + 8) and column nt * 8 + 2t + (i & 1)).
//   * scores become scale * log2(e) * s; where `need_mask` and !visible(half, col), -inf;
//   * row_max is raised to the tile's row max (a row that has seen nothing keeps -inf and is shifted by 0);
//   * row_sum (this thread's partial sum: the quad sums at the end) is rescaled and adds the probabilities
//     before dropout; alpha receives the rescaling factor of each row's output accumulator;
//   * s receives the probabilities after dropout (keep(half, col)), ready to be multiplied with V.
template <int NT, class Visible, class Keep>
PTV2_DEVICE void online_softmax(float (&s)[NT][4], float (&row_max)[2], float (&row_sum)[2], float (&alpha)[2],
                                float qk_scale_log2, bool need_mask, Visible visible, bool dropout, Keep keep,
                                int lane) {
  const int t = lane & 3;
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float x = s[nt][i] * qk_scale_log2;
      if (need_mask && !visible(i >> 1, nt * 8 + 2 * t + (i & 1))) x = -INFINITY;
      s[nt][i] = x;
      tile_max[i >> 1] = fmaxf(tile_max[i >> 1], x);
    }
  }
  float shift[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = fmaxf(row_max[r], quad_max(tile_max[r]));
    shift[r] = m_new == -INFINITY ? 0.f : m_new;
    alpha[r] = exp2f(row_max[r] - shift[r]);
    row_max[r] = m_new;
  }
  float sums[2] = {0.f, 0.f};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float prob = exp2f(s[nt][i] - shift[i >> 1]);
      sums[i >> 1] += prob;
      if (dropout && !keep(i >> 1, nt * 8 + 2 * t + (i & 1))) prob = 0.f;
      s[nt][i] = prob;
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * alpha[r] + sums[r];
}

template <int DT>
PTV2_DEVICE void rescale_rows(float (&o)[DT][4], const float (&alpha)[2]) {
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    o[dt][0] *= alpha[0];
    o[dt][1] *= alpha[0];
    o[dt][2] *= alpha[1];
    o[dt][3] *= alpha[1];
  }
}

// Write a warp row half's normalized output (C fragments o, columns < head_dim) to `out_row` (unit col stride):
// o / row_sum (0 where nothing was seen), times the dropout scale, NaN where the bank index was out of range.
template <typename T, int DT>
PTV2_DEVICE void store_output_row(T* out_row, const float (&o)[DT][4], int half, float row_sum, float dropout_scale,
                                  bool index_ok, int head_dim, int lane) {
  const int t = lane & 3;
  const float denominator = row_sum > 0.f ? row_sum : 1.f;
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    const int col = dt * 8 + 2 * t;
    if (col < head_dim) {
      float v0 = o[dt][2 * half] / denominator * dropout_scale;
      float v1 = o[dt][2 * half + 1] / denominator * dropout_scale;
      if (!index_ok) v0 = v1 = NAN;
      out_row[col] = from_float<T>(v0);
      if (col + 1 < head_dim) out_row[col + 1] = from_float<T>(v1);
    }
  }
}

}  // namespace ptv2
