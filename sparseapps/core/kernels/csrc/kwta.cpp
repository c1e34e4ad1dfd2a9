// k-winners-take-all followed by a sparse linear layer that reads only the winners' weight columns (CPU op
// sparseapps::kwta_csc_linear; twin: reference.kwta_csc_linear_reference).
//
// Per example b: the k largest keys x[b, j] * boost[j] (x[b, j] without boost) win, ties to the lower input j;
// the winners keep their value x[b, j], every other input is zero (k-WTA, Ahmad & Scheinkman 2019). Then
//     y[b, :] = bias + sum over winners j with x[b, j] != 0 of x[b, j] * W[:, j],
// where W is stored column by column (CSC): column j holds its nonzeros at [col_ptr[j], col_ptr[j + 1]) of
// row_indices / values. One example touches k of the in columns: k * nnz / in multiply-adds instead of nnz.
// Examples are independent (each has its own winners) and run in parallel over the batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

namespace sparseapps {
namespace {

// Multiply-adds below which one thread does everything (a parallel region costs microseconds).
constexpr int64_t kKwtaSerialWork = 1 << 15;

struct CscColumns {
  const int64_t* col_ptr;  // [in + 1]
  const void* rows;        // [nnz] int16 or int32 output positions
  const float* values;     // [nnz]
};

template <typename Index>
void kwta_csc_rows(const float* x, const float* boost, int64_t in, int64_t k, const CscColumns& w,
                   const float* bias, int64_t out, float* y, int64_t b0, int64_t b1) {
  const Index* rows = static_cast<const Index*>(w.rows);
  std::vector<float> keys(static_cast<size_t>(in));
  std::vector<int32_t> order(static_cast<size_t>(in));
  const int64_t winners = std::min(k, in);
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = x + b * in;
    float* yb = y + b * out;
    if (bias != nullptr) {
      std::memcpy(yb, bias, sizeof(float) * out);
    } else {
      std::memset(yb, 0, sizeof(float) * out);
    }
    std::iota(order.begin(), order.end(), 0);
    if (winners < in) {
      for (int64_t j = 0; j < in; ++j) keys[j] = boost != nullptr ? xb[j] * boost[j] : xb[j];
      const float* kp = keys.data();
      // Best first: higher key, then lower input.
      auto better = [kp](int32_t a, int32_t c) { return kp[a] > kp[c] || (kp[a] == kp[c] && a < c); };
      std::nth_element(order.begin(), order.begin() + (winners - 1), order.end(), better);
      std::sort(order.begin(), order.begin() + winners);  // ascending columns: a forward walk through W
    }
    for (int64_t t = 0; t < winners; ++t) {
      const int32_t j = order[t];
      const float v = xb[j];
      if (v == 0.0f) continue;
      for (int64_t e = w.col_ptr[j]; e < w.col_ptr[j + 1]; ++e) yb[rows[e]] += v * w.values[e];
    }
  }
}

at::Tensor kwta_csc_linear(const at::Tensor& x, const std::optional<at::Tensor>& boost, int64_t k,
                           const at::Tensor& col_ptr, const at::Tensor& row_indices, const at::Tensor& values,
                           const std::optional<at::Tensor>& bias, int64_t out_features) {
  const char* op = "sparseapps::kwta_csc_linear";
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1, op,
              ": expected a float32 CPU x [*, in], got ", x.scalar_type(), " of shape ", x.sizes(), " on ",
              x.device());
  const int64_t in = x.size(-1);
  TORCH_CHECK_VALUE(k >= 1, op, ": expected k >= 1, got ", k);
  TORCH_CHECK_VALUE(out_features >= 0, op, ": expected out_features >= 0, got ", out_features);
  TORCH_CHECK(col_ptr.device().is_cpu() && col_ptr.scalar_type() == at::kLong && col_ptr.dim() == 1 &&
                  col_ptr.size(0) == in + 1,
              op, ": expected col_ptr as 1-D int64 CPU of length in + 1 = ", in + 1, ", got ", col_ptr.scalar_type(),
              " of shape ", col_ptr.sizes());
  TORCH_CHECK(row_indices.device().is_cpu() && row_indices.dim() == 1 &&
                  (row_indices.scalar_type() == at::kShort || row_indices.scalar_type() == at::kInt),
              op, ": expected 1-D int16 or int32 CPU row_indices, got ", row_indices.scalar_type(), " of shape ",
              row_indices.sizes());
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == at::kFloat && values.dim() == 1 &&
                  values.size(0) == row_indices.size(0),
              op, ": expected 1-D float32 CPU values of length nnz = ", row_indices.size(0), ", got ",
              values.scalar_type(), " of shape ", values.sizes());
  if (boost.has_value()) {
    TORCH_CHECK(boost->device().is_cpu() && boost->scalar_type() == at::kFloat && boost->dim() == 1 &&
                    boost->size(0) == in,
                op, ": expected boost as float32 CPU of shape [", in, "], got ", boost->scalar_type(), " of shape ",
                boost->sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == out_features,
                op, ": expected bias as float32 CPU of shape [", out_features, "], got ", bias->scalar_type(),
                " of shape ", bias->sizes());
  }
  const int64_t nnz = row_indices.size(0);
  const at::Tensor cp = col_ptr.contiguous();
  const int64_t* cpp = cp.data_ptr<int64_t>();
  TORCH_CHECK(cpp[0] == 0 && cpp[in] == nnz, op, ": expected col_ptr from 0 to nnz=", nnz, ", got ", cpp[0], " to ",
              cpp[in]);
  for (int64_t j = 0; j < in; ++j) {
    TORCH_CHECK(cpp[j] <= cpp[j + 1], op, ": col_ptr decreases at column ", j, " (", cpp[j], " > ", cpp[j + 1], ")");
  }
  const at::Tensor ri = row_indices.contiguous();
  if (nnz > 0) {
    const bool narrow = ri.scalar_type() == at::kShort;
    int64_t low = 0, high = 0;
    if (narrow) {
      const int16_t* p = ri.data_ptr<int16_t>();
      const auto [mn, mx] = std::minmax_element(p, p + nnz);
      low = *mn;
      high = *mx;
    } else {
      const int32_t* p = ri.data_ptr<int32_t>();
      const auto [mn, mx] = std::minmax_element(p, p + nnz);
      low = *mn;
      high = *mx;
    }
    TORCH_CHECK(low >= 0 && high < out_features, op, ": expected row_indices in [0, ", out_features, "), got [", low,
                ", ", high, "]");
  }

  int64_t n = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) n *= x.size(d);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  at::Tensor y = at::empty({n, out_features}, x.options());
  if (n == 0) return y.view(shape);
  const at::Tensor xf = x.reshape({n, in}).contiguous();
  const float* xp = xf.data_ptr<float>();
  for (int64_t i = 0; i < n * in; ++i) {
    TORCH_CHECK_VALUE(!std::isnan(xp[i]), op, ": expected x without NaN, got NaN at example ", i / in, ", input ",
                      i % in);
  }
  const at::Tensor v = values.contiguous();
  const at::Tensor bo = boost.has_value() ? boost->contiguous() : at::Tensor();
  const at::Tensor bi = bias.has_value() ? bias->contiguous() : at::Tensor();
  const CscColumns w{cpp, ri.data_ptr(), v.data_ptr<float>()};
  const float* boost_p = boost.has_value() ? bo.data_ptr<float>() : nullptr;
  const float* bias_p = bias.has_value() ? bi.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const double per_row = static_cast<double>(std::min(k, in)) * static_cast<double>(nnz) /
                             static_cast<double>(std::max<int64_t>(in, 1)) +
                         static_cast<double>(in + out_features);
  const int64_t grain = std::min(n, std::max<int64_t>(1, static_cast<int64_t>(kKwtaSerialWork / per_row)));
  const bool narrow = ri.scalar_type() == at::kShort;
  at::parallel_for(0, n, grain, [&](int64_t b0, int64_t b1) {
    if (narrow) {
      kwta_csc_rows<int16_t>(xp, boost_p, in, k, w, bias_p, out_features, yp, b0, b1);
    } else {
      kwta_csc_rows<int32_t>(xp, boost_p, in, k, w, bias_p, out_features, yp, b0, b1);
    }
  });
  return y.view(shape);
}

}  // namespace
}  // namespace sparseapps

TORCH_LIBRARY_FRAGMENT(sparseapps, m) {
  m.def(
      "kwta_csc_linear(Tensor x, Tensor? boost, int k, Tensor col_ptr, Tensor row_indices, Tensor values, "
      "Tensor? bias, int out_features) -> Tensor",
      &sparseapps::kwta_csc_linear);
}
