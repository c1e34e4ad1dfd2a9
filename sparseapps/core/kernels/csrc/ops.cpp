// Torch custom ops over the raw kernels (CPU): sparseapps::condensed_linear, csr_linear, blocked_linear and
// csr_sddmm (the weight gradient of compact training layers).
//
// Layout work lives here: flattening leading dimensions, packing transposed activations for the tile path,
// placing rows at their output neurons, and restoring ablated neurons as bias only. Threading uses
// at::parallel_for, so torch.set_num_threads() governs it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "hashing.h"
#include "kernels.h"

namespace sparseapps {
namespace {

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

KernelTable best_kernels() {
  if (cpu_has_avx512()) return avx512_kernels();
  if (cpu_has_avx2()) return avx2_kernels();
  return generic_kernels();
}

// Tuning: condensed / CSR batches up to gather_max_batch take the gather path, larger ones the tile path,
// whose column tile is sized so that one tile of transposed activations ([in, columns] floats) fits in
// tile_bytes (about half an L2).
struct Tuning {
  KernelTable kernels = best_kernels();
  int64_t gather_max_batch = 1;
  int64_t tile_bytes = 512 * 1024;
};

Tuning& tuning() {
  static Tuning t;
  return t;
}

// Work (multiply-adds) below which one thread does everything: a parallel region costs microseconds.
constexpr int64_t kSerialWork = 1 << 15;

int64_t grain_for(int64_t items, double work_per_item) {
  const double per_item = std::max(work_per_item, 1.0);
  const int64_t serial_items = std::max<int64_t>(static_cast<int64_t>(kSerialWork / per_item), 1);
  return std::min(std::max<int64_t>(items, 1), serial_items);
}

int64_t leading_rows(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) n *= x.size(d);
  return n;
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

at::Tensor float_bias(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return at::Tensor();
  return bias->scalar_type() == at::kFloat ? bias->contiguous() : bias->to(at::kFloat).contiguous();
}

// Float result [n, out] -> the caller's dtype.
at::Tensor finish(const at::Tensor& y_float, const at::Tensor& x, int64_t out_features) {
  const at::Tensor y = x.scalar_type() == at::kFloat ? y_float : y_float.to(x.scalar_type());
  return y.view(output_shape(x, out_features));
}

void check_common(const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias,
                  int64_t out_features, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": expected x on the CPU, got ", x.device());
  TORCH_CHECK(values.device().is_cpu(), op, ": expected weights on the CPU, got ", values.device());
  TORCH_CHECK(x.dim() >= 1, op, ": expected x with at least one dimension, got a scalar");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16, op,
              ": expected float32 or bfloat16 weights, got ", values.scalar_type());
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), op, ": expected x of dtype ", values.scalar_type(),
              " (the weights'), got ", x.scalar_type());
  TORCH_CHECK(out_features >= 0, op, ": expected out_features >= 0, got ", out_features);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu(), op, ": expected bias on the CPU, got ", bias->device());
    TORCH_CHECK(bias->scalar_type() == values.scalar_type(), op, ": expected bias of dtype ", values.scalar_type(),
                ", got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op, ": expected bias of shape [", out_features,
                "], got ", bias->sizes());
  }
}

void check_rows(const std::optional<at::Tensor>& rows, int64_t n_rows, int64_t out_features, const char* op) {
  if (rows.has_value()) {
    TORCH_CHECK(rows->device().is_cpu() && rows->scalar_type() == at::kLong, op,
                ": expected rows as an int64 CPU tensor, got ", rows->scalar_type(), " on ", rows->device());
    TORCH_CHECK(rows->dim() == 1 && rows->size(0) == n_rows, op, ": expected rows of shape [", n_rows, "], got ",
                rows->sizes());
    TORCH_CHECK(n_rows <= out_features, op, ": expected at most out_features=", out_features, " rows, got ", n_rows);
  } else {
    TORCH_CHECK(n_rows == out_features, op, ": without rows, expected ", out_features, " sparse rows, got ", n_rows);
  }
}

// row_ptr as a contiguous 1-D int64 CPU tensor from 0 to nnz = indices.size(0), indices 1-D int16/int32 on the CPU.
at::Tensor checked_row_ptr(const at::Tensor& row_ptr, const at::Tensor& indices, const char* op) {
  TORCH_CHECK(row_ptr.device().is_cpu() && row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 &&
                  row_ptr.size(0) >= 1,
              op, ": expected row_ptr as a 1-D int64 CPU tensor of length rows + 1, got ", row_ptr.scalar_type(),
              " of shape ", row_ptr.sizes());
  TORCH_CHECK(indices.dim() == 1 && indices.device().is_cpu() &&
                  (indices.scalar_type() == at::kShort || indices.scalar_type() == at::kInt),
              op, ": expected 1-D int16 or int32 CPU indices, got ", indices.scalar_type(), " of shape ",
              indices.sizes(), " on ", indices.device());
  const at::Tensor p = row_ptr.contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  const int64_t n_rows = row_ptr.size(0) - 1;
  TORCH_CHECK(pp[0] == 0 && pp[n_rows] == indices.size(0), op, ": expected row_ptr from 0 to nnz=", indices.size(0),
              ", got ", pp[0], " to ", pp[n_rows]);
  return p;
}

// Zeroes the rows of yt [out, ld] that no sparse row writes (ablated neurons); has_map is false when row r
// goes to output r for every r (then every output row is written).
void zero_uncovered(float* yt, int64_t ld, int64_t out, bool has_map, const int64_t* row_map, int64_t n_rows) {
  if (!has_map) return;
  std::vector<char> covered(out, 0);
  for (int64_t r = 0; r < n_rows; ++r) covered[row_map[r]] = 1;
  for (int64_t o = 0; o < out; ++o) {
    if (!covered[o]) std::memset(yt + o * ld, 0, sizeof(float) * ld);
  }
}

// a [n, width] contiguous fp32 -> [width, ld] (transposed; batch padded with zeros to ld, a multiple of 16).
at::Tensor pack_transposed(const KernelTable& k, const at::Tensor& a, int64_t ld) {
  const int64_t n = a.size(0);
  const int64_t width = a.size(1);
  at::Tensor packed = at::empty({std::max<int64_t>(width, 1), ld}, a.options());
  const float* src = a.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  const int64_t blocks = (width + 15) / 16;
  at::parallel_for(0, blocks, grain_for(blocks, 16.0 * ld), [&](int64_t i0, int64_t i1) {
    k.pack(src, n, width, dst, ld, i0 * 16, std::min(i1 * 16, width));
  });
  return packed;
}

at::Tensor run_rows(const at::Tensor& x, SparseRows desc, bool has_map, int64_t total_nnz,
                    const std::optional<at::Tensor>& bias, int64_t out_features) {
  const Tuning& tune = tuning();
  const KernelTable& k = tune.kernels;
  const int64_t in = x.size(-1);
  const int64_t n = leading_rows(x);
  at::Tensor y = at::empty({n, out_features}, x.options().dtype(at::kFloat));
  if (n == 0 || out_features == 0) return finish(y, x, out_features);
  const at::Tensor bias_f = float_bias(bias);
  const float* bias_p = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  const at::Tensor xf = x.reshape({n, in}).to(at::kFloat).contiguous();
  const double mean_len = desc.n_rows > 0 ? static_cast<double>(total_nnz) / static_cast<double>(desc.n_rows) : 0.0;
  float* yp = y.data_ptr<float>();

  if (n <= tune.gather_max_batch && n <= kMaxSmallBatch) {
    at::Tensor yt = at::empty({out_features, n}, x.options().dtype(at::kFloat));
    float* ytp = yt.data_ptr<float>();
    zero_uncovered(ytp, n, out_features, has_map, desc.out_row, desc.n_rows);
    const float* xp = xf.data_ptr<float>();
    at::parallel_for(0, desc.n_rows, grain_for(desc.n_rows, mean_len * n),
                     [&](int64_t r0, int64_t r1) { k.gather(desc, xp, in, n, ytp, r0, r1); });
    for (int64_t b = 0; b < n; ++b) {
      for (int64_t o = 0; o < out_features; ++o) yp[b * out_features + o] = ytp[o * n + b] + (bias_p ? bias_p[o] : 0.0f);
    }
    return finish(y, x, out_features);
  }

  const int64_t ld = (n + 15) / 16 * 16;
  const at::Tensor xt = pack_transposed(k, xf, ld);
  const float* xtp = xt.data_ptr<float>();
  at::Tensor yt = at::empty({out_features, ld}, x.options().dtype(at::kFloat));
  float* ytp = yt.data_ptr<float>();
  zero_uncovered(ytp, ld, out_features, has_map, desc.out_row, desc.n_rows);
  int64_t tile_columns = 16;
  for (const int64_t c : {64, 32}) {
    if (in * c * static_cast<int64_t>(sizeof(float)) <= tune.tile_bytes) {
      tile_columns = c;
      break;
    }
  }
  at::parallel_for(0, desc.n_rows, grain_for(desc.n_rows, mean_len * ld),
                   [&](int64_t r0, int64_t r1) { k.tile(desc, xtp, ld, ytp, r0, r1, tile_columns); });
  const int64_t batch_blocks = (n + 15) / 16;
  at::parallel_for(0, batch_blocks, grain_for(batch_blocks, 16.0 * out_features), [&](int64_t b0, int64_t b1) {
    k.unpack(ytp, ld, out_features, bias_p, yp, b0 * 16, std::min(b1 * 16, n));
  });
  return finish(y, x, out_features);
}

at::Tensor condensed_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& rows,
                            int64_t out_features) {
  const char* op = "sparseapps::condensed_linear";
  TORCH_CHECK(values.dim() == 2, op, ": expected values of shape [rows, k], got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes(), op, ": expected indices of shape ", values.sizes(), ", got ",
              indices.sizes());
  TORCH_CHECK(indices.device().is_cpu() && (indices.scalar_type() == at::kShort || indices.scalar_type() == at::kInt),
              op, ": expected int16 or int32 CPU indices, got ", indices.scalar_type(), " on ", indices.device());
  check_common(x, values, bias, out_features, op);
  check_rows(rows, values.size(0), out_features, op);
  const at::Tensor v = values.contiguous();
  const at::Tensor i = indices.contiguous();
  const at::Tensor map = rows.has_value() ? rows->contiguous() : at::Tensor();
  SparseRows desc{v.data_ptr(),
                  i.data_ptr(),
                  nullptr,
                  rows.has_value() ? map.data_ptr<int64_t>() : nullptr,
                  v.size(1),
                  v.size(0),
                  i.scalar_type() == at::kShort,
                  v.scalar_type() == at::kBFloat16};
  return run_rows(x, desc, rows.has_value(), v.numel(), bias, out_features);
}

at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& values,
                      const at::Tensor& indices, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& rows, int64_t out_features) {
  const char* op = "sparseapps::csr_linear";
  TORCH_CHECK(values.dim() == 1 && indices.dim() == 1 && values.size(0) == indices.size(0), op,
              ": expected 1-D values and indices of equal length, got ", values.sizes(), " and ", indices.sizes());
  const at::Tensor p = checked_row_ptr(row_ptr, indices, op);
  const int64_t* pp = p.data_ptr<int64_t>();
  const int64_t n_rows = row_ptr.size(0) - 1;
  check_common(x, values, bias, out_features, op);
  check_rows(rows, n_rows, out_features, op);
  const at::Tensor v = values.contiguous();
  const at::Tensor i = indices.contiguous();
  const at::Tensor map = rows.has_value() ? rows->contiguous() : at::Tensor();
  SparseRows desc{v.data_ptr(),
                  i.data_ptr(),
                  pp,
                  rows.has_value() ? map.data_ptr<int64_t>() : nullptr,
                  0,
                  n_rows,
                  i.scalar_type() == at::kShort,
                  v.scalar_type() == at::kBFloat16};
  return run_rows(x, desc, rows.has_value(), v.numel(), bias, out_features);
}

// The weight gradient of a CSR layer on its active entries: grad[e] = sum_b dy[b, r] * x[b, indices[e]] for
// every entry e of row r (row r is output r). Few batch rows gather their inputs; more are transposed once and
// each entry becomes a dot product over the batch, in column tiles that keep the transposed inputs in L2.
at::Tensor csr_sddmm(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& row_ptr, const at::Tensor& indices) {
  const char* op = "sparseapps::csr_sddmm";
  TORCH_CHECK(x.device().is_cpu() && dy.device().is_cpu(), op, ": expected x and dy on the CPU, got ", x.device(),
              " and ", dy.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat && dy.scalar_type() == at::kFloat, op,
              ": expected float32 x and dy, got ", x.scalar_type(), " and ", dy.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && dy.dim() >= 1 && leading_rows(x) == leading_rows(dy), op,
              ": expected x [*, in] and dy [*, out] with the same number of rows, got ", x.sizes(), " and ",
              dy.sizes());
  const at::Tensor p = checked_row_ptr(row_ptr, indices, op);
  const int64_t out = dy.size(-1);
  TORCH_CHECK(row_ptr.size(0) == out + 1, op, ": expected row_ptr of length out + 1 = ", out + 1, ", got ",
              row_ptr.size(0));
  const int64_t nnz = indices.size(0);
  at::Tensor grad = at::zeros({nnz}, x.options());
  const int64_t n = leading_rows(x);
  if (n == 0 || nnz == 0) return grad;
  const Tuning& tune = tuning();
  const KernelTable& k = tune.kernels;
  const int64_t in = x.size(-1);
  const at::Tensor xf = x.reshape({n, in}).contiguous();
  const at::Tensor dyf = dy.reshape({n, out}).contiguous();
  const at::Tensor i = indices.contiguous();
  SparseRows desc{nullptr, i.data_ptr(), p.data_ptr<int64_t>(), nullptr, 0, out, i.scalar_type() == at::kShort, false};
  const double mean_len = static_cast<double>(nnz) / static_cast<double>(std::max<int64_t>(out, 1));
  float* gp = grad.data_ptr<float>();
  if (n <= kMaxSmallBatch) {
    const float* xp = xf.data_ptr<float>();
    const float* dyp = dyf.data_ptr<float>();
    at::parallel_for(0, out, grain_for(out, mean_len * n),
                     [&](int64_t r0, int64_t r1) { k.sddmm_gather(desc, xp, in, dyp, out, n, gp, r0, r1); });
    return grad;
  }
  const int64_t ld = (n + 15) / 16 * 16;
  const at::Tensor xt = pack_transposed(k, xf, ld);
  const at::Tensor dyt = pack_transposed(k, dyf, ld);
  const float* xtp = xt.data_ptr<float>();
  const float* dytp = dyt.data_ptr<float>();
  // Column tiles of at least 64 batch rows, wider while a tile of xt still fits in tile_bytes.
  const int64_t fit = tune.tile_bytes / (std::max<int64_t>(in, 1) * static_cast<int64_t>(sizeof(float))) / 16 * 16;
  const int64_t columns = std::min(ld, std::max<int64_t>(64, fit));
  at::parallel_for(0, out, grain_for(out, mean_len * ld), [&](int64_t r0, int64_t r1) {
    for (int64_t c0 = 0; c0 < ld; c0 += columns) k.sddmm_tile(desc, xtp, dytp, ld, gp, r0, r1, c0, std::min(c0 + columns, ld));
  });
  return grad;
}

at::Tensor blocked_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& lanes,
                          const at::Tensor& chunks, const at::Tensor& group_ptr,
                          const std::optional<at::Tensor>& lane_rows, const std::optional<at::Tensor>& bias,
                          int64_t out_features, int64_t max_threads) {
  const char* op = "sparseapps::blocked_linear";
  check_common(x, values, bias, out_features, op);
  TORCH_CHECK(values.dim() == 2 && values.size(1) == kLanes, op, ": expected values of shape [steps, 16], got ",
              values.sizes());
  TORCH_CHECK(lanes.device().is_cpu() && lanes.scalar_type() == at::kByte && lanes.sizes() == values.sizes(), op,
              ": expected uint8 lanes of shape ", values.sizes(), ", got ", lanes.scalar_type(), " ", lanes.sizes());
  TORCH_CHECK(chunks.device().is_cpu() && chunks.scalar_type() == at::kShort && chunks.dim() == 2 &&
                  chunks.size(0) == values.size(0) && chunks.size(1) == 2,
              op, ": expected int16 chunks of shape [", values.size(0), ", 2], got ", chunks.scalar_type(), " ",
              chunks.sizes());
  TORCH_CHECK(group_ptr.device().is_cpu() && group_ptr.scalar_type() == at::kLong && group_ptr.dim() == 1 &&
                  group_ptr.size(0) >= 1,
              op, ": expected a 1-D int64 group_ptr, got ", group_ptr.scalar_type(), " ", group_ptr.sizes());
  const int64_t n_groups = group_ptr.size(0) - 1;
  if (lane_rows.has_value()) {
    TORCH_CHECK(lane_rows->device().is_cpu() && lane_rows->scalar_type() == at::kLong && lane_rows->dim() == 1 &&
                    lane_rows->size(0) == n_groups * kLanes,
                op, ": expected int64 lane_rows of shape [", n_groups * kLanes, "], got ", lane_rows->sizes());
  } else {
    TORCH_CHECK(n_groups * kLanes >= out_features, op, ": without lane_rows, expected at least out_features=",
                out_features, " lanes, got ", n_groups * kLanes);
  }
  const at::Tensor gp = group_ptr.contiguous();
  const int64_t* gpp = gp.data_ptr<int64_t>();
  TORCH_CHECK(gpp[0] == 0 && gpp[n_groups] == values.size(0), op, ": expected group_ptr from 0 to steps=",
              values.size(0), ", got ", gpp[0], " to ", gpp[n_groups]);

  TORCH_CHECK(max_threads >= 0, op, ": expected max_threads >= 0 (0: torch's thread count), got ", max_threads);
  const int64_t in = x.size(-1);
  const int64_t n = leading_rows(x);
  at::Tensor y = at::empty({n, out_features}, x.options().dtype(at::kFloat));
  if (n == 0 || out_features == 0) return finish(y, x, out_features);
  const at::Tensor bias_f = float_bias(bias);
  const float* bias_p = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t width = n_groups * kLanes;
  // Without lane_rows every row is kept in order: lane j is output j (lanes past out_features are empty).
  const bool identity = !lane_rows.has_value();
  const at::Tensor lr = identity ? at::Tensor() : lane_rows->contiguous();
  const int64_t* lrp = identity ? nullptr : lr.data_ptr<int64_t>();
  if (!identity) {
    for (int64_t j = 0; j < width; ++j) {
      TORCH_CHECK(lrp[j] < out_features, op, ": lane_rows holds ", lrp[j], ", expected < out_features=", out_features);
    }
  }

  // Activations padded with zeros to whole pairs of chunks (the kernels read 16 floats per chunk); a
  // contiguous float32 input of a suitable width is used as it is.
  const int64_t ldx = (in + 2 * kChunk - 1) / (2 * kChunk) * (2 * kChunk);
  at::Tensor xpad;
  if (x.scalar_type() == at::kFloat && x.is_contiguous() && ldx == in && in > 0) {
    xpad = x.view({n, in});
  } else {
    xpad = at::empty({n, std::max<int64_t>(ldx, 1)}, x.options().dtype(at::kFloat));
    const at::Tensor xf = x.reshape({n, in}).to(at::kFloat).contiguous();
    const float* src = xf.data_ptr<float>();
    float* dst = xpad.data_ptr<float>();
    for (int64_t b = 0; b < n; ++b) {
      if (in > 0) std::memcpy(dst + b * ldx, src + b * in, sizeof(float) * in);
      std::memset(dst + b * ldx + in, 0, sizeof(float) * (ldx - in));
    }
  }
  // Lanes in output order and no padding lanes: the kernels write y directly.
  const bool direct = identity && width == out_features;
  at::Tensor yt = direct ? y : at::empty({n, std::max<int64_t>(width, 1)}, x.options().dtype(at::kFloat));
  float* ytp = yt.data_ptr<float>();
  if (n_groups > 0) {
    const at::Tensor v = values.contiguous();
    const at::Tensor l = lanes.contiguous();
    const at::Tensor c = chunks.contiguous();
    BlockedRows desc{v.data_ptr(), l.data_ptr<uint8_t>(), c.data_ptr<int16_t>(), gpp, n_groups,
                     v.scalar_type() == at::kBFloat16};
    const float* xp = xpad.data_ptr<float>();
    const KernelTable& k = tuning().kernels;
    const double steps_per_group = static_cast<double>(values.size(0)) / static_cast<double>(n_groups);
    for (int64_t b0 = 0; b0 < n; b0 += kMaxSmallBatch) {
      const int64_t nb = std::min<int64_t>(kMaxSmallBatch, n - b0);
      // At most max_threads chunks (one per thread); a single chunk runs inline, without a parallel region.
      int64_t grain = grain_for(n_groups, steps_per_group * kLanes * nb);
      if (max_threads > 0) grain = std::max(grain, (n_groups + max_threads - 1) / max_threads);
      at::parallel_for(0, n_groups, grain, [&](int64_t g0, int64_t g1) {
        k.blocked(desc, xp + b0 * ldx, ldx, nb, ytp + b0 * width, g0, g1);
      });
    }
  }
  for (int64_t b = 0; b < n; ++b) {
    float* yrow = yp + b * out_features;
    const float* trow = ytp + b * width;
    if (identity) {
      if (bias_p != nullptr) {
        for (int64_t o = 0; o < out_features; ++o) yrow[o] = trow[o] + bias_p[o];
      } else if (!direct) {
        std::memcpy(yrow, trow, sizeof(float) * out_features);
      }
      continue;
    }
    if (bias_p != nullptr) std::memcpy(yrow, bias_p, sizeof(float) * out_features);
    else std::memset(yrow, 0, sizeof(float) * out_features);
    for (int64_t j = 0; j < width; ++j) {
      if (lrp[j] >= 0) yrow[lrp[j]] += trow[j];
    }
  }
  return finish(y, x, out_features);
}

// Counter-based uniform numbers for tie noise and random scores (hashing.h), about 20x faster than torch.rand on a
// CPU core and with no generator state, so a tensor of them is produced in parallel.
// Values [i0, i1) of one 2^32 block (the high word of i is the constant `high`), cloned per instruction set so
// the 32-bit multiplies vectorize (the baseline x86-64 has no packed 32-bit multiply).
__attribute__((target_clones("avx512f", "avx2", "default"))) void hashed_uniform_block(
    float* p, int64_t i0, int64_t i1, uint32_t key0, uint32_t key_high) {
  for (int64_t i = i0; i < i1; ++i) {
    p[i] = hashed_uniform_value(i, key0, key_high);
  }
}

at::Tensor hashed_uniform(int64_t seed, int64_t numel) {
  TORCH_CHECK(numel >= 0, "sparseapps::hashed_uniform: expected numel >= 0, got ", numel);
  TORCH_CHECK(seed >= 0, "sparseapps::hashed_uniform: expected seed >= 0, got ", seed);
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  float* p = out.data_ptr<float>();
  const uint32_t key0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  const uint32_t key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  at::parallel_for(0, numel, 1 << 16, [&](int64_t i0, int64_t i1) {
    constexpr int64_t kBlock = int64_t{1} << 32;
    for (int64_t b0 = i0; b0 < i1;) {
      const int64_t b1 = std::min(i1, (b0 / kBlock + 1) * kBlock);
      const uint32_t key_high = key1 + static_cast<uint32_t>(static_cast<uint64_t>(b0) >> 32) * 0x85ebca6bu;
      hashed_uniform_block(p, b0, b1, key0, key_high);
      b0 = b1;
    }
  });
  return out;
}

// scores[i] += float(u(seed, i) * factor): tie noise added in place, one pass, no [numel] temporary (a fresh
// float tensor of a 4096 x 4096 layer costs ~25 ms of page faults). The product is rounded before the sum, as in
// the twin (reference.add_hashed_uniform_reference): no fused multiply-add.
__attribute__((target_clones("avx512f", "avx2", "default"), optimize("fp-contract=off"))) void add_hashed_block(
    float* p, int64_t i0, int64_t i1, uint32_t key0, uint32_t key_high, float factor) {
  for (int64_t i = i0; i < i1; ++i) {
    const float noise = hashed_uniform_value(i, key0, key_high) * factor;
    p[i] = p[i] + noise;
  }
}

at::Tensor& add_hashed_uniform_(at::Tensor& scores, int64_t seed, double factor) {
  const char* op = "sparseapps::add_hashed_uniform_";
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.is_contiguous() && scores.device().is_cpu(), op,
              ": expected a contiguous float32 CPU tensor, got ", scores.scalar_type(), " on ", scores.device());
  TORCH_CHECK(seed >= 0, op, ": expected seed >= 0, got ", seed);
  float* p = scores.data_ptr<float>();
  const int64_t numel = scores.numel();
  const float f = static_cast<float>(factor);
  const uint32_t key0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  const uint32_t key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  at::parallel_for(0, numel, 1 << 16, [&](int64_t i0, int64_t i1) {
    constexpr int64_t kBlock = int64_t{1} << 32;
    for (int64_t b0 = i0; b0 < i1;) {
      const int64_t b1 = std::min(i1, (b0 / kBlock + 1) * kBlock);
      const uint32_t key_high = key1 + static_cast<uint32_t>(static_cast<uint64_t>(b0) >> 32) * 0x85ebca6bu;
      add_hashed_block(p, b0, b1, key0, key_high, f);
      b0 = b1;
    }
  });
  return scores;
}

// The n best candidates of a score vector as a bool mask: best = highest (or lowest) score, ties to the lower
// position, so the result is one exact set (twin: rules.select_top_reference). A threshold read off a strided
// sample of the candidates keeps ~3n of them in one pass; nth_element then orders only those. About 5x fewer
// passes over the [N] inputs than the same selection in torch ops.
// Branchless compaction of the candidates whose key passes `threshold` into (keys, positions), a block of entries
// at a time so that the buffers only grow to about the number kept.
void collect(const float* s, const bool* c, int64_t size, float sign, float threshold, std::vector<float>& keys,
             std::vector<int64_t>& positions) {
  constexpr int64_t kBlock = 4096;
  int64_t count = 0;
  for (int64_t b0 = 0; b0 < size; b0 += kBlock) {
    const int64_t b1 = std::min(size, b0 + kBlock);
    if (count + kBlock + 1 > static_cast<int64_t>(keys.size())) {
      const size_t grown = std::max<size_t>(2 * keys.size(), static_cast<size_t>(count + kBlock + 1));
      keys.resize(grown);
      positions.resize(grown);
    }
    float* k = keys.data();
    int64_t* p = positions.data();
    for (int64_t i = b0; i < b1; ++i) {
      const float key = sign * s[i];
      k[count] = key;
      p[count] = i;
      count += static_cast<int64_t>(c[i] & (key >= threshold));
    }
  }
  keys.resize(static_cast<size_t>(count));
  positions.resize(static_cast<size_t>(count));
}

at::Tensor select_top(const at::Tensor& scores, const at::Tensor& candidates, int64_t n, bool largest,
                      int64_t available) {
  const char* op = "sparseapps::select_top";
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 1 &&
                  scores.is_contiguous(),
              op, ": expected contiguous 1-D float32 CPU scores, got ", scores.scalar_type(), " ", scores.sizes());
  TORCH_CHECK(candidates.device().is_cpu() && candidates.scalar_type() == at::kBool &&
                  candidates.sizes() == scores.sizes() && candidates.is_contiguous(),
              op, ": expected contiguous bool candidates of shape ", scores.sizes(), ", got ",
              candidates.scalar_type(), " ", candidates.sizes());
  const int64_t size = scores.numel();
  at::Tensor selected = at::zeros({size}, candidates.options());
  if (n <= 0) return selected;
  const float* s = scores.data_ptr<float>();
  const bool* c = candidates.data_ptr<bool>();
  bool* out = selected.data_ptr<bool>();
  if (available < 0) {
    const uint8_t* cu = reinterpret_cast<const uint8_t*>(c);
    available = 0;
    for (int64_t i = 0; i < size; ++i) available += cu[i];
  }
  TORCH_CHECK(n <= available, op, ": cannot select ", n, " entries from ", available, " candidates");
  // Signed keys: larger is better either way (for the lowest scores, the negated score).
  const float sign = largest ? 1.0f : -1.0f;
  float threshold = -std::numeric_limits<float>::infinity();
  if (size >= (int64_t{1} << 16) && 2 * n < available) {
    // ~1.5n survivors: a quantile of a sample of the candidates (2^14 of them, strided)
    const int64_t stride = std::max<int64_t>(1, size / std::max<int64_t>(1, (int64_t{1} << 14) * size / available));
    std::vector<float> sample;
    for (int64_t i0 = 0; i0 < size; i0 += stride) {
      // jittered within the stride by a hash, so that the sample does not align with a matrix's columns
      const int64_t i = std::min(size - 1, i0 + static_cast<int64_t>(fmix32(static_cast<uint32_t>(i0 / stride) + 1u) %
                                                                     static_cast<uint32_t>(stride)));
      if (c[i]) sample.push_back(sign * s[i]);
    }
    if (sample.size() > 256) {
      const double share = 1.5 * static_cast<double>(n) / static_cast<double>(available);
      int64_t rank = static_cast<int64_t>(std::llround(static_cast<double>(sample.size()) * (1.0 - share)));
      rank = std::min<int64_t>(std::max<int64_t>(rank, 1), static_cast<int64_t>(sample.size())) - 1;
      std::nth_element(sample.begin(), sample.begin() + rank, sample.end());
      threshold = sample[rank];
    }
  }
  std::vector<float> keys(static_cast<size_t>(std::min<int64_t>(size, 2 * n)) + 4097);
  std::vector<int64_t> positions(keys.size());
  collect(s, c, size, sign, threshold, keys, positions);
  if (static_cast<int64_t>(keys.size()) < n)
    collect(s, c, size, sign, -std::numeric_limits<float>::infinity(), keys, positions);
  const int64_t count = static_cast<int64_t>(keys.size());
  std::vector<int64_t> order(static_cast<size_t>(count));
  for (int64_t t = 0; t < count; ++t) order[t] = t;
  // Best first: higher key, then lower position (positions ascend with t, so compare t).
  auto better = [&](int64_t a, int64_t b) { return keys[a] > keys[b] || (keys[a] == keys[b] && a < b); };
  if (count > n) std::nth_element(order.begin(), order.begin() + (n - 1), order.end(), better);
  for (int64_t t = 0; t < n; ++t) out[positions[order[t]]] = true;
  return selected;
}

// The transposed structure of a CSR layer by a counting sort (entries by column, rows ascending within a column):
// t_row_ptr [in + 1] int64, t_indices [nnz] (rows, in t_index_dtype) and t_order [nnz] int32/int64 (each
// transposed entry's position in the row-major values). Twin: reference.csr_transpose_reference.
template <typename Index, typename Row, typename Order>
void transpose_fill(const int64_t* rp, const Index* col, int64_t rows, int64_t* tp, Row* t_rows, Order* t_order) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t e = rp[r]; e < rp[r + 1]; ++e) {
      const int64_t slot = tp[static_cast<int64_t>(col[e])]++;
      t_rows[slot] = static_cast<Row>(r);
      t_order[slot] = static_cast<Order>(e);
    }
  }
}

std::vector<at::Tensor> csr_transpose(const at::Tensor& row_ptr, const at::Tensor& indices, int64_t in_features,
                                      at::ScalarType t_index_dtype) {
  const char* op = "sparseapps::csr_transpose";
  const at::Tensor p = checked_row_ptr(row_ptr, indices, op);
  TORCH_CHECK(t_index_dtype == at::kShort || t_index_dtype == at::kInt, op,
              ": expected int16 or int32 transposed indices, got ", t_index_dtype);
  const int64_t rows = row_ptr.size(0) - 1;
  const int64_t nnz = indices.size(0);
  const at::Tensor i = indices.contiguous();
  at::Tensor counts = at::zeros({in_features + 1}, row_ptr.options());
  int64_t* cp = counts.data_ptr<int64_t>();
  const bool narrow = i.scalar_type() == at::kShort;
  for (int64_t e = 0; e < nnz; ++e) {
    const int64_t column = narrow ? i.data_ptr<int16_t>()[e] : i.data_ptr<int32_t>()[e];
    TORCH_CHECK(0 <= column && column < in_features, op, ": column ", column, " of entry ", e, " is outside [0, ",
                in_features, ")");
    ++cp[column + 1];
  }
  for (int64_t c = 0; c < in_features; ++c) cp[c + 1] += cp[c];
  at::Tensor t_row_ptr = counts.clone();  // counts becomes the running insertion point of each column
  at::Tensor t_indices = at::empty({nnz}, row_ptr.options().dtype(t_index_dtype));
  const bool wide_order = nnz >= (int64_t{1} << 31);
  at::Tensor t_order = at::empty({nnz}, row_ptr.options().dtype(wide_order ? at::kLong : at::kInt));
  const int64_t* rp = p.data_ptr<int64_t>();
  auto fill = [&](auto* col) {
    if (t_index_dtype == at::kShort) {
      if (wide_order) transpose_fill(rp, col, rows, cp, t_indices.data_ptr<int16_t>(), t_order.data_ptr<int64_t>());
      else transpose_fill(rp, col, rows, cp, t_indices.data_ptr<int16_t>(), t_order.data_ptr<int32_t>());
    } else {
      if (wide_order) transpose_fill(rp, col, rows, cp, t_indices.data_ptr<int32_t>(), t_order.data_ptr<int64_t>());
      else transpose_fill(rp, col, rows, cp, t_indices.data_ptr<int32_t>(), t_order.data_ptr<int32_t>());
    }
  };
  if (narrow) fill(i.data_ptr<int16_t>());
  else fill(i.data_ptr<int32_t>());
  return {t_row_ptr, t_indices, t_order};
}

std::string describe() {
  const Tuning& t = tuning();
  return std::string("isa=") + t.kernels.isa + ";gather_max_batch=" + std::to_string(t.gather_max_batch) +
         ";tile_bytes=" + std::to_string(t.tile_bytes) + ";threads=" + std::to_string(at::get_num_threads()) +
         ";avx512=" + (cpu_has_avx512() ? "1" : "0") + ";avx2=" + (cpu_has_avx2() ? "1" : "0");
}

// For tests and tuning only: picks the instruction set ("avx512", "avx2", "generic", or "" for the best the
// CPU has) and the two tuning knobs (a value < 0 keeps the current one). Returns the new description.
std::string configure(const std::string& isa, int64_t gather_max_batch, int64_t tile_bytes) {
  Tuning& t = tuning();
  if (isa.empty()) {
    t.kernels = best_kernels();
  } else if (isa == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "sparseapps::_configure: this CPU lacks AVX-512 (F, BW, VL, DQ)");
    t.kernels = avx512_kernels();
  } else if (isa == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "sparseapps::_configure: this CPU lacks AVX2 + FMA");
    t.kernels = avx2_kernels();
  } else if (isa == "generic") {
    t.kernels = generic_kernels();
  } else {
    TORCH_CHECK(false, "sparseapps::_configure: expected isa in {'', 'avx512', 'avx2', 'generic'}, got '", isa, "'");
  }
  if (gather_max_batch >= 0) {
    TORCH_CHECK(gather_max_batch <= kMaxSmallBatch, "sparseapps::_configure: expected gather_max_batch <= ",
                kMaxSmallBatch, ", got ", gather_max_batch);
    t.gather_max_batch = gather_max_batch;
  }
  if (tile_bytes >= 0) t.tile_bytes = tile_bytes;
  return describe();
}

}  // namespace
}  // namespace sparseapps

TORCH_LIBRARY(sparseapps, m) {
  m.def(
      "condensed_linear(Tensor x, Tensor values, Tensor indices, Tensor? bias, Tensor? rows, int out_features) -> "
      "Tensor");
  m.def(
      "csr_linear(Tensor x, Tensor row_ptr, Tensor values, Tensor indices, Tensor? bias, Tensor? rows, "
      "int out_features) -> Tensor");
  m.def(
      "blocked_linear(Tensor x, Tensor values, Tensor lanes, Tensor chunks, Tensor group_ptr, Tensor? lane_rows, "
      "Tensor? bias, int out_features, int max_threads=0) -> Tensor");
  m.def("csr_sddmm(Tensor x, Tensor dy, Tensor row_ptr, Tensor indices) -> Tensor");
  m.def("kernel_info() -> str", &sparseapps::describe);
  m.def("hashed_uniform(int seed, int numel) -> Tensor", &sparseapps::hashed_uniform);
  m.def("add_hashed_uniform_(Tensor(a!) scores, int seed, float factor) -> Tensor(a!)", &sparseapps::add_hashed_uniform_);
  m.def("csr_transpose(Tensor row_ptr, Tensor indices, int in_features, ScalarType t_index_dtype) -> Tensor[]",
        &sparseapps::csr_transpose);
  m.def("select_top(Tensor scores, Tensor candidates, int n, bool largest, int available=-1) -> Tensor",
        &sparseapps::select_top);
  m.def("_configure(str isa, int gather_max_batch, int tile_bytes) -> str", &sparseapps::configure);
}

TORCH_LIBRARY_IMPL(sparseapps, CPU, m) {
  m.impl("condensed_linear", &sparseapps::condensed_linear);
  m.impl("csr_linear", &sparseapps::csr_linear);
  m.impl("blocked_linear", &sparseapps::blocked_linear);
  m.impl("csr_sddmm", &sparseapps::csr_sddmm);
}
