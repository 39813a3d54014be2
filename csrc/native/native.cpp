// The native backend's common calls in C++ (the extension ptv2_kernels._native, built for CPU and CUDA torch
// alike): prefix attention as two calls of torch's fused CPU attention, one over the prefix and one over the
// sequence, merged by log-sum-exp. ptv2_kernels/native.py holds the formulas and every other case; this file only
// saves the per-call Python work of the case a model runs at every layer: both parts have keys, no dropout, no
// bias gradient, no lse gradient. Arguments arrive checked and normalized by ptv2_kernels/ops.py, the parts'
// masks derived (and remembered) by native.py.
//
//   forward(q, k, v, prefix_k, prefix_v, prefix_index?, prefix_mask?, prefix_rows?, sequence_mask?,
//           sequence_causal, sequence_rows?, scale, sequence_padding?)
//       -> (out [B, Hq, Nq, Dv] in [B, Nq, Hq, Dv] memory, lse float32)
//   backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index?, prefix_mask?, prefix_rows?, sequence_mask?,
//            sequence_causal, sequence_rows?, out, lse, scale) -> (dq, dk, dv, d_prefix_k, d_prefix_v)
//
// prefix_k/prefix_v are the bank [T, Hkv, P, D]; prefix_index [B] (contiguous int) picks each sample's entry (None:
// T = 1, read through a stride-0 view). The masks are additive float masks the fused kernel takes; *_rows are bool
// tensors broadcastable to [B, Hq, Nq], false where a row sees no key of that part (the fused kernel then gives
// lse 0, not -inf), None where every row sees one. The forward may get the sequence's key-padding mask instead
// (sequence_padding, bool [B, Nk], True = attend; then no sequence_mask or sequence_rows): a model makes a new one
// each step, which the direct pass reads as it is and the fused calls derive their mask from here.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// Rows of the merge handled per task: below this much work a second thread costs more than it saves.
constexpr int64_t kMergeGrain = 1 << 15;

// The softmax statistics are computed in float64 for float64 inputs, float32 otherwise (the fused kernel's lse).
at::ScalarType accumulate_type(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor as_type(const Tensor& t, at::ScalarType type) { return t.scalar_type() == type ? t : t.to(type); }

// The sample's prefix keys or values in q's dtype: [B, Hkv, P, D], gathered per sample or a stride-0 view.
Tensor prefix_part(const Tensor& bank, const OptionalTensor& prefix_index, const Tensor& q) {
  Tensor part = prefix_index.has_value() ? at::index_select(bank, 0, *prefix_index)
                                         : bank.expand({q.size(0), -1, -1, -1});
  return as_type(part, q.scalar_type());
}

// The rows-seeing tensor as a [B, Hq, Nq] view (stride 0 where it broadcasts), or an undefined tensor.
Tensor rows_view(const OptionalTensor& rows, const Tensor& q) {
  if (!rows.has_value()) return Tensor();
  TORCH_CHECK(rows->scalar_type() == at::kBool, "ptv2_kernels._native: rows tensors are bool, got ",
              rows->scalar_type());
  return rows->expand({q.size(0), q.size(1), q.size(2)});
}

struct Part {
  Tensor out, lse;  // [B, Hq, Nq, Dv] (the kernel's [B, Nq, Hq, Dv] memory) and [B, Hq, Nq]
  Tensor rows;      // [B, Hq, Nq] bool view, or undefined: every row sees a key of this part
};

Part fused_part(const Tensor& q, const Tensor& keys, const Tensor& values, const OptionalTensor& mask, bool causal,
                const OptionalTensor& rows, double scale) {
  auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(q, keys, values, 0.0, causal, mask, scale);
  return {out, lse, rows_view(rows, q)};
}

// A prefix shared by the whole batch (one bank entry, no lengths) is attended alike by every sample's rows: the
// batch's queries as the rows of one sample make one fused call over B * Nq rows (and its backward returns the
// prefix gradient summed over the batch) instead of B calls' worth of small blocks over P keys. measured on the
// suite's key-padding shape (B4 H8 N256 P32 D64, float32, 2 threads): the prefix part's forward 1.03 -> 0.79 ms,
// its backward 2.0 -> 1.65 ms.
//
// x [B, H, N, D] as [1, H, B * N, D], a view where its samples follow one another along N (a model's [B, N, H, D]
// projections); undefined where they do not.
Tensor batch_as_rows(const Tensor& x) {
  const int64_t batch = x.size(0), len = x.size(2);
  const int64_t row_stride = len == 1 ? x.stride(0) : x.stride(2);
  if (batch > 1 && len > 1 && x.stride(0) != len * x.stride(2)) return Tensor();
  return x.as_strided({1, x.size(1), batch * len, x.size(3)}, {batch * len * row_stride, x.stride(1), row_stride,
                                                               x.stride(3)}, x.storage_offset());
}

// [1, H, B * N, D] (any strides) back as [B, H, N, D].
Tensor rows_as_batch(const Tensor& x, int64_t batch) {
  return x.transpose(1, 2).reshape({batch, x.size(2) / batch, x.size(1), x.size(3)}).transpose(1, 2);
}

bool shares_prefix_rows(const Tensor& q, const OptionalTensor& prefix_index, const OptionalTensor& prefix_mask,
                        const OptionalTensor& prefix_rows) {
  return q.size(0) > 1 && !prefix_index.has_value() && !prefix_mask.has_value() && !prefix_rows.has_value();
}

// The prefix part: the batch as rows where it shares one prefix, else each sample's prefix (a stride-0 view or a
// gather) in one fused call.
Part prefix_fused_part(const Tensor& q, const Tensor& prefix_k, const Tensor& prefix_v,
                       const OptionalTensor& prefix_index, const OptionalTensor& prefix_mask,
                       const OptionalTensor& prefix_rows, double scale) {
  if (shares_prefix_rows(q, prefix_index, prefix_mask, prefix_rows)) {
    const Tensor rows = batch_as_rows(q);
    if (rows.defined()) {
      auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
          rows, as_type(prefix_k, q.scalar_type()), as_type(prefix_v, q.scalar_type()), 0.0, false, std::nullopt,
          scale);
      const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2);
      return {rows_as_batch(out, batch), lse.reshape({heads, batch, q_len}).permute({1, 0, 2}), Tensor()};
    }
  }
  return fused_part(q, prefix_part(prefix_k, prefix_index, q), prefix_part(prefix_v, prefix_index, q), prefix_mask,
                    false, prefix_rows, scale);
}

// The merge of the two parts into out (q's dtype) and lse (float32, or `lse_type`): with per-part lse l_p, l_s,
// l = logaddexp(l_p, l_s) and out = o_s + w (o_p - o_s) with the prefix weight w = exp(l_p - l) = sigmoid(l_p - l_s),
// the formula native.py's lerp computes. A part whose row sees no key is left out of that row (its output is not
// read); a row that sees no key of either part gets out 0 and lse -inf.
template <typename scalar_t>
void merge_rows(const Part& prefix, const Part& sequence, Tensor& out, Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = out.size(0), heads = out.size(1), q_len = out.size(2), dim = out.size(3);
  const scalar_t* po = prefix.out.const_data_ptr<scalar_t>();
  const scalar_t* so = sequence.out.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const auto* pl = prefix.lse.const_data_ptr<acc_t>();
  const auto* sl = sequence.lse.const_data_ptr<acc_t>();
  float* l_out = lse.scalar_type() == at::kFloat ? lse.mutable_data_ptr<float>() : nullptr;
  double* l_out64 = l_out == nullptr ? lse.mutable_data_ptr<double>() : nullptr;
  const bool* prows = prefix.rows.defined() ? prefix.rows.const_data_ptr<bool>() : nullptr;
  const bool* srows = sequence.rows.defined() ? sequence.rows.const_data_ptr<bool>() : nullptr;
  // strides in elements, [b, h, i, d] for the outputs and [b, h, i] for the lse and rows
  const auto pos = prefix.out.strides(), sos = sequence.out.strides(), os = out.strides();
  const auto pls = prefix.lse.strides(), sls = sequence.lse.strides(), ls = lse.strides();
  const auto prs = prefix.rows.defined() ? prefix.rows.strides() : at::IntArrayRef();
  const auto srs = sequence.rows.defined() ? sequence.rows.strides() : at::IntArrayRef();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t rows = batch * heads * q_len;
  const int64_t grain = std::max<int64_t>(1, kMergeGrain / std::max<int64_t>(dim, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (heads * q_len), h = (row / q_len) % heads, i = row % q_len;
      const bool prefix_seen = prows == nullptr || prows[b * prs[0] + h * prs[1] + i * prs[2]];
      const bool sequence_seen = srows == nullptr || srows[b * srs[0] + h * srs[1] + i * srs[2]];
      const acc_t lp = prefix_seen ? pl[b * pls[0] + h * pls[1] + i * pls[2]] : neg_inf;
      const acc_t lsq = sequence_seen ? sl[b * sls[0] + h * sls[1] + i * sls[2]] : neg_inf;
      const scalar_t* p_row = po + b * pos[0] + h * pos[1] + i * pos[2];
      const scalar_t* s_row = so + b * sos[0] + h * sos[1] + i * sos[2];
      scalar_t* o_row = o + b * os[0] + h * os[1] + i * os[2];
      acc_t merged;
      if (prefix_seen && sequence_seen) {
        const acc_t weight = acc_t(1) / (acc_t(1) + std::exp(lsq - lp));
        const acc_t high = std::max(lp, lsq);
        merged = high + std::log1p(std::exp(std::min(lp, lsq) - high));
        for (int64_t d = 0; d < dim; ++d) {
          const acc_t s = static_cast<acc_t>(s_row[d]);
          o_row[d] = static_cast<scalar_t>(s + weight * (static_cast<acc_t>(p_row[d]) - s));
        }
      } else if (prefix_seen || sequence_seen) {
        merged = prefix_seen ? lp : lsq;
        const scalar_t* seen = prefix_seen ? p_row : s_row;
        for (int64_t d = 0; d < dim; ++d) o_row[d] = seen[d];
      } else {
        merged = neg_inf;
        for (int64_t d = 0; d < dim; ++d) o_row[d] = scalar_t(0);
      }
      const int64_t at = b * ls[0] + h * ls[1] + i * ls[2];
      if (l_out != nullptr) {
        l_out[at] = static_cast<float>(merged);
      } else {
        l_out64[at] = static_cast<double>(merged);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Small problems: one pass over both key sets. Each fused call costs several microseconds however little it
// computes (buffers, its own parallel loop); below direct_work_limit multiply-adds the scores, softmax and output of a
// row are computed here directly, prefix keys first, which gives the merged out and lse with no merge at all.
// ---------------------------------------------------------------------------------------------------------------

// Multiply-adds (B * Hq * Nq * (P + Nk) * (Dk + Dv)) up to which the direct pass runs instead of the fused calls:
// measured on a 2-core AVX-512 Xeon, one thread: the direct pass takes ~3 us + 1 us per 5k multiply-adds, the two
// fused calls and their merge ~19 us at 2^15 and ~26 us at 1.25 * 2^17 (32 us direct). Settable
// (set_direct_work_limit) for tests that run both.
int64_t direct_work_limit = 1 << 16;
// Multiply-adds per task of the direct pass's parallel loop.
constexpr int64_t kDirectGrain = 1 << 15;

// A row of q against one key: the keys' head dim is contiguous (q's is copied into `query` in float/double).
template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* query, const scalar_t* key, int64_t stride, int64_t dim) {
  if (stride != 1) {
    acc_t total = 0;
    for (int64_t d = 0; d < dim; ++d) total += query[d] * static_cast<acc_t>(key[d * stride]);
    return total;
  }
  constexpr int kLanes = 8;  // independent partial sums: the compiler vectorizes them
  acc_t partial[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) partial[l] += query[d + l] * static_cast<acc_t>(key[d + l]);
  }
  acc_t total = 0;
  for (; d < dim; ++d) total += query[d] * static_cast<acc_t>(key[d]);
  for (int l = 0; l < kLanes; ++l) total += partial[l];
  return total;
}

template <typename acc_t, typename scalar_t>
inline void add_scaled(acc_t* out, acc_t weight, const scalar_t* value, int64_t stride, int64_t dim) {
  if (stride == 1) {
    for (int64_t d = 0; d < dim; ++d) out[d] += weight * static_cast<acc_t>(value[d]);
  } else {
    for (int64_t d = 0; d < dim; ++d) out[d] += weight * static_cast<acc_t>(value[d * stride]);
  }
}

// A 4-D tensor's element strides and base pointer, for reading [b, h, i, j] with broadcast dims at stride 0.
template <typename T>
struct Strided4 {
  const T* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  Strided4() = default;
  explicit Strided4(const Tensor& t) : data(t.const_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)),
                                       s2(t.stride(2)), s3(t.stride(3)) {}
  const T* at(int64_t a, int64_t b, int64_t c) const { return data + a * s0 + b * s1 + c * s2; }
};

template <typename scalar_t>
void direct_rows(const Tensor& q, const Tensor& prefix_k, const Tensor& prefix_v, const OptionalTensor& prefix_index,
                 const Tensor& prefix_mask, const Tensor& k, const Tensor& v, const Tensor& sequence_mask,
                 const Tensor& padding, bool top_left_causal, double scale, Tensor& out, Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  const int64_t value_dim = v.size(3), group = heads / k.size(1), prefix_len = prefix_k.size(2), k_len = k.size(2);
  const Strided4<scalar_t> qs(q), ks(k), vs(v), pks(prefix_k), pvs(prefix_v), os(out);
  const Strided4<acc_t> pm = prefix_mask.defined() ? Strided4<acc_t>(prefix_mask) : Strided4<acc_t>();
  const Strided4<acc_t> sm = sequence_mask.defined() ? Strided4<acc_t>(sequence_mask) : Strided4<acc_t>();
  const int64_t* entries = prefix_index.has_value() ? prefix_index->const_data_ptr<int64_t>() : nullptr;
  const bool* attend = padding.defined() ? padding.const_data_ptr<bool>() : nullptr;
  const int64_t pad0 = padding.defined() ? padding.stride(0) : 0, pad1 = padding.defined() ? padding.stride(1) : 0;
  float* lse_data = lse.mutable_data_ptr<float>();
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity(), step = static_cast<acc_t>(scale);
  const int64_t rows = batch * heads * q_len, per_row = (prefix_len + k_len) * (dim + value_dim);
  at::parallel_for(0, rows, std::max<int64_t>(1, kDirectGrain / std::max<int64_t>(per_row, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores(prefix_len + k_len), query(dim), total(value_dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (heads * q_len), h = (row / q_len) % heads, i = row % q_len, g = h / group;
      const int64_t entry = entries == nullptr ? 0 : entries[b];
      const scalar_t* q_row = qs.at(b, h, i);
      for (int64_t d = 0; d < dim; ++d) query[d] = static_cast<acc_t>(q_row[d * qs.s3]);
      acc_t high = neg_inf;
      for (int64_t j = 0; j < prefix_len; ++j) {
        acc_t score = step * dot(query.data(), pks.at(entry, g, j), pks.s3, dim);
        if (pm.data != nullptr) score += pm.at(b, 0, 0)[j * pm.s3];
        scores[j] = score;
        high = std::max(high, score);
      }
      const int64_t visible = top_left_causal ? std::min(k_len, i + 1) : k_len;
      const acc_t* mask_row = sm.data != nullptr ? sm.at(b, h, i) : nullptr;
      for (int64_t j = 0; j < k_len; ++j) {
        acc_t score = neg_inf;
        if (j < visible && (attend == nullptr || attend[b * pad0 + j * pad1])) {
          score = step * dot(query.data(), ks.at(b, g, j), ks.s3, dim);
          if (mask_row != nullptr) score += mask_row[j * sm.s3];
        }
        scores[prefix_len + j] = score;
        high = std::max(high, score);
      }
      scalar_t* o_row = out.mutable_data_ptr<scalar_t>() + b * os.s0 + h * os.s1 + i * os.s2;
      float& row_lse = lse_data[b * ls0 + h * ls1 + i * ls2];
      if (high == neg_inf) {  // the row sees no key of either part
        for (int64_t d = 0; d < value_dim; ++d) o_row[d] = scalar_t(0);
        row_lse = -std::numeric_limits<float>::infinity();
        continue;
      }
      std::fill(total.begin(), total.end(), acc_t(0));
      acc_t sum = 0;
      for (int64_t j = 0; j < prefix_len + k_len; ++j) {
        if (scores[j] == neg_inf) continue;
        const acc_t p = std::exp(scores[j] - high);
        sum += p;
        if (j < prefix_len) {
          add_scaled(total.data(), p, pvs.at(entry, g, j), pvs.s3, value_dim);
        } else {
          add_scaled(total.data(), p, vs.at(b, g, j - prefix_len), vs.s3, value_dim);
        }
      }
      const acc_t inverse = acc_t(1) / sum;
      for (int64_t d = 0; d < value_dim; ++d) o_row[d] = static_cast<scalar_t>(total[d] * inverse);
      row_lse = static_cast<float>(high + std::log(sum));
    }
  });
}

// The mask as a [B, Hq, Nq, cols] view in the accumulation dtype, or an undefined tensor.
Tensor mask_view(const OptionalTensor& mask, const Tensor& q, int64_t cols) {
  if (!mask.has_value()) return Tensor();
  Tensor m = as_type(*mask, accumulate_type(q));
  while (m.dim() < 4) m = m.unsqueeze(0);
  return m.expand({q.size(0), q.size(1), q.size(2), cols});
}

bool direct_serves(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k) {
  const int64_t work = q.size(0) * q.size(1) * q.size(2) * (prefix_k.size(2) + k.size(2)) * (q.size(3) + v.size(3));
  return work <= direct_work_limit;
}

std::tuple<Tensor, Tensor> direct_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                                          const Tensor& prefix_v, const OptionalTensor& prefix_index,
                                          const OptionalTensor& prefix_mask, const OptionalTensor& sequence_mask,
                                          const OptionalTensor& sequence_padding, bool sequence_causal,
                                          double scale) {
  const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2), dim = v.size(3);
  Tensor out = at::empty_strided({batch, heads, q_len, dim}, {q_len * heads * dim, dim, heads * dim, 1}, q.options());
  Tensor lse = at::empty({batch, heads, q_len}, q.options().dtype(at::kFloat));
  OptionalTensor index;
  if (prefix_index.has_value()) {  // checked by ops.py; checked again here, where it is read on the host
    index = as_type(*prefix_index, at::kLong).contiguous();
    const int64_t* entries = index->const_data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(entries[b] >= 0 && entries[b] < prefix_k.size(0), "ptv2_kernels._native: prefix_index entry ",
                  entries[b], " is out of the bank's range [0, ", prefix_k.size(0), ")");
    }
  }
  const Tensor pmask = mask_view(prefix_mask, q, prefix_k.size(2)), smask = mask_view(sequence_mask, q, k.size(2));
  // the bank in q's dtype (a converted copy of the bank only, where its dtype differs)
  const Tensor keys = as_type(prefix_k, q.scalar_type()), values = as_type(prefix_v, q.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ptv2_native_direct", [&] {
    direct_rows<scalar_t>(q, keys, values, index, pmask, k, v, smask, sequence_padding.value_or(Tensor()),
                          sequence_causal, scale, out, lse);
  });
  return {out, lse};
}

void check_common(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k, const Tensor& prefix_v) {
  for (const Tensor* t : {&q, &k, &v, &prefix_k, &prefix_v}) {
    TORCH_CHECK(t->device().is_cpu(), "ptv2_kernels._native: CPU tensors only, got ", t->device());
    TORCH_CHECK(t->dim() == 4, "ptv2_kernels._native: 4-D tensors, got ", t->dim(), "-D");
  }
  TORCH_CHECK(k.size(2) > 0 && prefix_k.size(2) > 0 && q.numel() > 0,
              "ptv2_kernels._native: both parts must have keys and q must be non-empty (native.py serves the rest)");
}

// (out in q's dtype in [B, Nq, Hq, Dv] memory, lse in `lse_type`) over both parts.
std::tuple<Tensor, Tensor> merged_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                                          const Tensor& prefix_v, const OptionalTensor& prefix_index,
                                          const OptionalTensor& prefix_mask, const OptionalTensor& prefix_rows,
                                          const OptionalTensor& sequence_mask, bool sequence_causal,
                                          const OptionalTensor& sequence_rows, double scale, at::ScalarType lse_type) {
  check_common(q, k, v, prefix_k, prefix_v);
  const Part prefix = prefix_fused_part(q, prefix_k, prefix_v, prefix_index, prefix_mask, prefix_rows, scale);
  const Part sequence = fused_part(q, k, v, sequence_mask, sequence_causal, sequence_rows, scale);
  const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2), dim = v.size(3);
  Tensor out = at::empty_strided({batch, heads, q_len, dim}, {q_len * heads * dim, dim, heads * dim, 1}, q.options());
  Tensor lse = at::empty({batch, heads, q_len}, q.options().dtype(lse_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ptv2_native_merge",
                                  [&] { merge_rows<scalar_t>(prefix, sequence, out, lse); });
  return {out, lse};
}

std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                                   const Tensor& prefix_v, const OptionalTensor& prefix_index,
                                   const OptionalTensor& prefix_mask, const OptionalTensor& prefix_rows,
                                   const OptionalTensor& sequence_mask, bool sequence_causal,
                                   const OptionalTensor& sequence_rows, double scale,
                                   const OptionalTensor& sequence_padding) {
  check_common(q, k, v, prefix_k, prefix_v);
  if (sequence_padding.has_value()) {
    TORCH_CHECK(!sequence_mask.has_value() && !sequence_rows.has_value(),
                "ptv2_kernels._native: sequence_padding replaces sequence_mask and sequence_rows");
    TORCH_CHECK(sequence_padding->scalar_type() == at::kBool && sequence_padding->dim() == 2 &&
                    sequence_padding->size(0) == q.size(0) && sequence_padding->size(1) == k.size(2),
                "ptv2_kernels._native: sequence_padding must be bool [B, Nk]");
  }
  if (direct_serves(q, k, v, prefix_k)) {
    return direct_forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mask, sequence_mask, sequence_padding,
                          sequence_causal, scale);
  }
  OptionalTensor mask = sequence_mask, rows = sequence_rows;
  if (sequence_padding.has_value() && !sequence_padding->all().item<bool>()) {
    // as native.py's key-padding part: an additive mask [B, 1, 1, Nk], and the samples that see some key
    const Tensor attend = sequence_padding->view({q.size(0), 1, 1, k.size(2)});
    mask = at::zeros(attend.sizes(), q.options().dtype(accumulate_type(q)))
               .masked_fill_(attend.logical_not(), -std::numeric_limits<double>::infinity());
    rows = attend.any(-1);
  }
  return merged_forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mask, prefix_rows, mask, sequence_causal,
                        rows, scale, at::kFloat);
}

// ---------------------------------------------------------------------------------------------------------------
// The common inference call in one step: a call of the op with no index, no lengths, at most a key-padding mask
// and no other option, where nothing needs a gradient. Its checks and its choice of backend and masks are the ones
// ops.py and native.py would make, done here on the tensors' metadata; where any of them would come out otherwise
// (an argument ops.py would reject, a case native.py derives masks for, a gradient) it returns None and the caller
// takes the full path, which raises the error or computes the case. What it computes is native.forward's call.
// ---------------------------------------------------------------------------------------------------------------

bool native_dtype(const Tensor& t) {
  const at::ScalarType type = t.scalar_type();
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

bool last_dim_contiguous(const Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1; }

std::optional<Tensor> common_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                                     const Tensor& prefix_v, const OptionalTensor& key_padding_mask, bool causal,
                                     std::optional<double> scale) {
  const std::optional<Tensor> none;
  for (const Tensor* t : {&q, &k, &v, &prefix_k, &prefix_v}) {
    if (!t->defined() || !t->device().is_cpu() || !native_dtype(*t)) return none;
  }
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad() ||
                                     prefix_k.requires_grad() || prefix_v.requires_grad())) {
    return none;  // the autograd path records the call
  }
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || q.scalar_type() != k.scalar_type() ||
      q.scalar_type() != v.scalar_type() || !last_dim_contiguous(q) || !last_dim_contiguous(k) ||
      !last_dim_contiguous(v)) {
    return none;
  }
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), k_len = k.size(2);
  if (k.size(0) != batch || k.size(3) != dim || v.sizes() != k.sizes() || dim == 0 || kv_heads == 0 ||
      q_heads % kv_heads != 0 || k_len == 0 || q.numel() == 0) {
    return none;  // Dv != Dk (the native backend does not serve it), no sequence keys or no queries: the full path
  }
  if ((prefix_k.dim() != 3 && prefix_k.dim() != 4) || prefix_v.sizes() != prefix_k.sizes() ||
      prefix_k.scalar_type() != prefix_v.scalar_type()) {
    return none;
  }
  const Tensor bank_k = prefix_k.dim() == 3 ? prefix_k.unsqueeze(0) : prefix_k;
  const Tensor bank_v = prefix_v.dim() == 3 ? prefix_v.unsqueeze(0) : prefix_v;
  if (bank_k.size(0) != 1 || bank_k.size(1) != kv_heads || bank_k.size(2) == 0 || bank_k.size(3) != dim) {
    return none;  // several entries need an index; an empty prefix is the full path's case
  }
  if (key_padding_mask.has_value()) {
    const Tensor& mask = *key_padding_mask;
    if (!mask.defined() || !mask.device().is_cpu() || mask.scalar_type() != at::kBool || mask.dim() != 2 ||
        mask.size(0) != batch || mask.size(1) != k_len || (causal && q_len != 1)) {
      return none;
    }
  } else if (causal && q_len != 1 && q_len != k_len) {
    return none;  // native.py derives the bottom-right causal mask
  }
  if (scale.has_value() && !std::isfinite(*scale)) return none;
  const double score_scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(dim));
  // a single query sees every key under the bottom-right causal rule; the kernel's own rule serves Nq == Nk
  const bool kernel_causal = causal && q_len != 1 && !key_padding_mask.has_value();
  return std::get<0>(forward(q, k, v, bank_k, bank_v, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                             kernel_causal, std::nullopt, score_scale, key_padding_mask));
}

// The bank's gradient: each entry's per-sample gradient summed over the samples that used it, in float32 (float64
// for a float64 bank), then in the bank's dtype.
Tensor reduced_prefix_grad(const Tensor& per_sample, const OptionalTensor& prefix_index, const Tensor& bank) {
  const at::ScalarType accumulate = at::promote_types(at::kFloat, bank.scalar_type());
  Tensor total;
  if (!prefix_index.has_value()) {
    total = as_type(per_sample, accumulate).sum(0, /*keepdim=*/true);
  } else {
    total = at::zeros(bank.sizes(), bank.options().dtype(accumulate));
    total.index_add_(0, as_type(*prefix_index, at::kLong), as_type(per_sample, accumulate));
  }
  return as_type(total, bank.scalar_type());
}

// Each part's fused backward, called with the merged output and lse, gives that part's exact share of the
// gradients (its probabilities are exp(s - lse), its row term rowsum(dO * out) the merged one).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
    const Tensor& prefix_v, const OptionalTensor& prefix_index, const OptionalTensor& prefix_mask,
    const OptionalTensor& prefix_rows, const OptionalTensor& sequence_mask, bool sequence_causal,
    const OptionalTensor& sequence_rows, const Tensor& out, const Tensor& lse, double scale) {
  check_common(q, k, v, prefix_k, prefix_v);
  const at::ScalarType accumulate = accumulate_type(q);
  Tensor merged_out = as_type(out, q.scalar_type()), merged_lse = as_type(lse, accumulate);
  if (q.scalar_type() == at::kDouble) {  // the saved lse is float32: recompute both in full precision
    std::tie(merged_out, merged_lse) = merged_forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mask,
                                                      prefix_rows, sequence_mask, sequence_causal, sequence_rows,
                                                      scale, at::kDouble);
  }
  if (prefix_rows.has_value() || sequence_rows.has_value()) {
    // a row that sees no key has lse -inf: exp(s - lse) would be NaN; with +inf its probabilities are 0
    merged_lse = merged_lse.masked_fill(merged_lse.isneginf(), std::numeric_limits<double>::infinity());
  }
  // grad_out in the kernel's [B, Nq, Hq, Dv] memory: the fused backward copies it there otherwise, once per part
  Tensor upstream = as_type(grad_out, q.scalar_type());
  if (!upstream.transpose(1, 2).is_contiguous()) upstream = upstream.transpose(1, 2).contiguous().transpose(1, 2);
  Tensor dq_prefix, dk_prefix, dv_prefix;
  const Tensor q_rows = shares_prefix_rows(q, prefix_index, prefix_mask, prefix_rows) ? batch_as_rows(q) : Tensor();
  const Tensor upstream_rows = q_rows.defined() ? batch_as_rows(upstream) : Tensor();
  const Tensor out_rows = upstream_rows.defined() ? batch_as_rows(merged_out) : Tensor();
  if (out_rows.defined()) {  // the batch as the rows of one sample, as in the forward (prefix_fused_part)
    const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2);
    const Tensor lse_rows = merged_lse.permute({1, 0, 2}).reshape({1, heads, batch * q_len});
    std::tie(dq_prefix, dk_prefix, dv_prefix) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        upstream_rows, q_rows, as_type(prefix_k, q.scalar_type()), as_type(prefix_v, q.scalar_type()), out_rows,
        lse_rows, 0.0, false, std::nullopt, scale);
    dq_prefix = rows_as_batch(dq_prefix, batch);
  } else {
    const Tensor prefix_keys = prefix_part(prefix_k, prefix_index, q);
    const Tensor prefix_values = prefix_part(prefix_v, prefix_index, q);
    std::tie(dq_prefix, dk_prefix, dv_prefix) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        upstream, q, prefix_keys, prefix_values, merged_out, merged_lse, 0.0, false, prefix_mask, scale);
  }
  auto [dq_sequence, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      upstream, q, k, v, merged_out, merged_lse, 0.0, sequence_causal, sequence_mask, scale);
  Tensor dq = as_type(dq_prefix, accumulate);  // a fresh tensor either way: summed into in place
  dq.add_(dq_sequence);
  return {as_type(dq, q.scalar_type()), as_type(dk, k.scalar_type()), as_type(dv, v.scalar_type()),
          reduced_prefix_grad(dk_prefix, prefix_index, prefix_k), reduced_prefix_grad(dv_prefix, prefix_index, prefix_v)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ptv2_kernels' native backend host path: prefix and sequence fused parts merged by log-sum-exp, in C++";
  m.def("forward", &forward, "(out, lse) of prefix attention over both parts (see csrc/native/native.cpp)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("prefix_k"),
        pybind11::arg("prefix_v"), pybind11::arg("prefix_index"), pybind11::arg("prefix_mask"),
        pybind11::arg("prefix_rows"), pybind11::arg("sequence_mask"), pybind11::arg("sequence_causal"),
        pybind11::arg("sequence_rows"), pybind11::arg("scale"), pybind11::arg("sequence_padding") = pybind11::none());
  m.def("common_forward", &common_forward,
        "out of the common inference call (no index, lengths or option but a key-padding mask; nothing needing a "
        "gradient), or None where the full path must serve it",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("prefix_k"),
        pybind11::arg("prefix_v"), pybind11::arg("key_padding_mask"), pybind11::arg("causal"), pybind11::arg("scale"));
  m.def("direct_work_limit", []() { return direct_work_limit; },
        "Multiply-adds up to which the forward makes one direct pass over both key sets instead of two fused calls");
  m.def("set_direct_work_limit", [](int64_t limit) { direct_work_limit = limit; },
        "Set direct_work_limit (0: always the fused calls; tests compare the two)");
  m.def("backward", &backward, "(dq, dk, dv, d_prefix_k, d_prefix_v) of prefix attention over both parts");
}
