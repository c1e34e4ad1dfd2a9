// Topology updates of compact layers without [out, in] masks or scores (CPU ops; twins in reference.py):
//
// - hashed_uniform_at: the tie noise / random scores of chosen positions only (the active entries' drop scores);
// - grow_select: the n best growth candidates of a layer, scored |g| + tie noise (or a uniform draw), where the
//   dense gradient g = dy^T x is formed a block of rows at a time from the captured factors (or read from a dense
//   gradient, whole or as its nonzero rows only: an embedding table's looked-up rows) and never held whole; the
//   active entries are skipped by walking their sorted positions;
// - merge_positions: the new entry list from the kept and the grown positions;
// - sorted_index: where each of some ascending positions sits in an ascending list (-1 where absent).
//
// The selection is the one of select_top (ops.cpp) on the dense scores: best = higher score, ties to the lower
// position. Scores match the dense path bit for bit: |g| + float(u * factor) with the product rounded first.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "hashing.h"

namespace sparseapps {
namespace {

at::Tensor hashed_uniform_at(int64_t seed, const at::Tensor& positions) {
  const char* op = "sparseapps::hashed_uniform_at";
  TORCH_CHECK(seed >= 0, op, ": expected seed >= 0, got ", seed);
  TORCH_CHECK(positions.device().is_cpu() && positions.scalar_type() == at::kLong && positions.dim() == 1, op,
              ": expected 1-D int64 CPU positions, got ", positions.scalar_type(), " ", positions.sizes());
  const at::Tensor p = positions.contiguous();
  at::Tensor out = at::empty({p.numel()}, p.options().dtype(at::kFloat));
  const int64_t* pp = p.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const HashKey key(seed);
  at::parallel_for(0, p.numel(), 1 << 14, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      TORCH_CHECK(pp[k] >= 0, op, ": position ", pp[k], " at ", k, " is negative");
      o[k] = hashed_uniform_value(pp[k], key.key0, key.high(pp[k]));
    }
  });
  return out;
}

// Where the growth scores come from.
struct GrowSource {
  const float* dense = nullptr;        // [rows, cols] row-major, or [n_dense_rows, cols] with dense_rows, or
  bool rows_only = false;              // `dense` holds the ascending rows dense_rows only; every other row of g is 0
  const int64_t* dense_rows = nullptr;
  int64_t n_dense_rows = 0;
  at::Tensor dy, x;                    // dy [B, rows], x [B, cols]: g = dy^T x
  at::Tensor dy_t, x_t;                // their transposes [rows, B], [cols, B]: a sampled entry reads two rows
  bool random = false;                 // scores are u(seed, i) alone
  int64_t cols = 0;
  float exact_factor = -1.0f;          // >= 0: a dense gradient's scores are formed whole, |g| + u * factor

  // Row r of a dense gradient, or nullptr where it is a row of zeros left out of `dense`.
  const float* dense_row(int64_t r) const {
    if (!rows_only) return dense + r * cols;
    const int64_t* end = dense_rows + n_dense_rows;
    const int64_t* it = std::lower_bound(dense_rows, end, r);
    return (it != end && *it == r) ? dense + (it - dense_rows) * cols : nullptr;
  }

  // Rows [r0, r1) of g (or nothing for random scores): a pointer to row-major [r1 - r0, cols] values.
  const float* block(int64_t r0, int64_t r1, at::Tensor& holder) const {
    if (random) return nullptr;
    if (dense != nullptr && !rows_only) return dense + r0 * cols;
    if (dense != nullptr) {  // the block's rows of zeros filled in (a block is ~L2-sized)
      holder = at::zeros({r1 - r0, cols}, at::kFloat);
      float* h = holder.data_ptr<float>();
      const int64_t* end = dense_rows + n_dense_rows;
      for (const int64_t* it = std::lower_bound(dense_rows, end, r0); it != end && *it < r1; ++it) {
        std::copy_n(dense + (it - dense_rows) * cols, cols, h + (*it - r0) * cols);
      }
      return h;
    }
    holder = at::mm(dy.narrow(1, r0, r1 - r0).t(), x);
    return holder.data_ptr<float>();
  }

  // g at one position of a dense gradient.
  float dense_value(int64_t i) const {
    const float* row = dense_row(i / cols);
    return row == nullptr ? 0.0f : row[i % cols];
  }

  // |g| at one position (the threshold's sample; any rounding will do there).
  float sample(int64_t i) const {
    if (dense != nullptr) return std::fabs(dense_value(i));
    const int64_t batch = dy_t.size(1);
    const float* d = dy_t.data_ptr<float>() + (i / cols) * batch;
    const float* xp = x_t.data_ptr<float>() + (i % cols) * batch;
    float sum = 0.0f;
    for (int64_t b = 0; b < batch; ++b) sum += d[b] * xp[b];
    return std::fabs(sum);
  }
};

struct Collected {
  std::vector<float> keys;  // |g| of the kept candidates, or their exact scores (uniform draws, |g| + noise)
  std::vector<int64_t> positions;
  float max_abs = 0.0f;     // max |g| over every entry of the block, the active ones included (tie noise scale)
};

// Max |v| over [0, len) and, a group of 16 at a time, the entries whose |v| passes `threshold` appended (base + t).
// Few pass (~2n of the layer's entries), so most groups cost one vectorized max; a group with a passing entry is
// compacted without branches (a branch per entry mispredicts at these rates).
__attribute__((target_clones("avx512f", "avx2", "default"))) void scan(const float* v, int64_t len, int64_t base,
                                                                         float threshold, Collected& out) {
  constexpr int64_t kGroup = 16;
  float m = out.max_abs;
  int64_t count = static_cast<int64_t>(out.keys.size());
  auto reserve = [&](int64_t extra) {
    if (count + extra > static_cast<int64_t>(out.keys.size())) {
      const size_t grown = std::max<size_t>(2 * out.keys.size(), static_cast<size_t>(count + extra + 4096));
      out.keys.resize(grown);
      out.positions.resize(grown);
    }
  };
  int64_t t = 0;
  for (; t + kGroup <= len; t += kGroup) {
    float gm = 0.0f;  // the group's largest |v|: some entry passes iff it does
    for (int64_t j = 0; j < kGroup; ++j) {
      const float a = std::fabs(v[t + j]);
      gm = gm > a ? gm : a;
    }
    m = m > gm ? m : gm;
    if (gm >= threshold) {
      reserve(kGroup);
      float* k = out.keys.data();
      int64_t* p = out.positions.data();
      for (int64_t j = 0; j < kGroup; ++j) {
        const float a = std::fabs(v[t + j]);
        k[count] = a;
        p[count] = base + t + j;
        count += static_cast<int64_t>(a >= threshold);
      }
    }
  }
  reserve(kGroup);
  for (; t < len; ++t) {
    const float a = std::fabs(v[t]);
    m = m > a ? m : a;
    out.keys[static_cast<size_t>(count)] = a;
    out.positions[static_cast<size_t>(count)] = base + t;
    count += static_cast<int64_t>(a >= threshold);
  }
  out.keys.resize(static_cast<size_t>(count));
  out.positions.resize(static_cast<size_t>(count));
  out.max_abs = m;
}

// out[t] = u(base + t) (no g), or |g[t]| + float(u(base + t) * factor) as the dense path computes it.
__attribute__((target_clones("avx512f", "avx2", "default"), optimize("fp-contract=off"))) void exact_scores(
    const float* g, int64_t base, int64_t len, const HashKey& key, float factor, float* out) {
  if (g == nullptr) {
    for (int64_t t = 0; t < len; ++t) out[t] = hashed_uniform_value(base + t, key.key0, key.high(base + t));
    return;
  }
  for (int64_t t = 0; t < len; ++t) {
    const float noise = hashed_uniform_value(base + t, key.key0, key.high(base + t)) * factor;
    out[t] = std::fabs(g[t]) + noise;
  }
}

// Entries of rows [r0, r1) whose score passes `threshold`, the excluded ones included (removed afterwards).
void collect_rows(const GrowSource& source, int64_t r0, int64_t r1, const HashKey& key, float threshold,
                  Collected& out) {
  const int64_t cols = source.cols;
  at::Tensor holder;
  const float* g = source.block(r0, r1, holder);
  const int64_t base = r0 * cols, len = (r1 - r0) * cols;
  if (g == nullptr || source.exact_factor >= 0.0f) {  // the block's exact scores: uniform draws, or |g| + noise
    std::vector<float> scores(static_cast<size_t>(len));
    exact_scores(g, base, len, key, std::max(source.exact_factor, 0.0f), scores.data());
    scan(scores.data(), len, base, threshold, out);
    out.max_abs = 0.0f;
    return;
  }
  scan(g, len, base, threshold, out);
}

// All candidates passing `threshold` (excluded positions removed), in ascending position, and max |g|.
Collected collect_all(const GrowSource& source, int64_t rows, const int64_t* excluded, int64_t n_excluded,
                      const HashKey& key, float threshold, int64_t block_entries) {
  // Blocks of ~block_entries (tuned per machine): the block of g stays in L2 between the product and the scan.
  const int64_t block_rows = std::max<int64_t>(1, block_entries / std::max<int64_t>(1, source.cols));
  const int64_t n_blocks = (rows + block_rows - 1) / block_rows;
  std::vector<Collected> parts(static_cast<size_t>(n_blocks));
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      collect_rows(source, b * block_rows, std::min(rows, (b + 1) * block_rows), key, threshold,
                   parts[static_cast<size_t>(b)]);
    }
  });
  Collected all;
  size_t total = 0;
  for (const Collected& part : parts) total += part.keys.size();
  all.keys.reserve(total);
  all.positions.reserve(total);
  int64_t e = 0;  // walks the excluded positions alongside the ascending collected ones
  for (const Collected& part : parts) {
    for (size_t t = 0; t < part.keys.size(); ++t) {
      const int64_t i = part.positions[t];
      while (e < n_excluded && excluded[e] < i) ++e;
      if (e < n_excluded && excluded[e] == i) continue;
      all.keys.push_back(part.keys[t]);
      all.positions.push_back(i);
    }
    all.max_abs = std::max(all.max_abs, part.max_abs);
  }
  return all;
}

// score + float(u * factor), the product rounded before the sum (as add_hashed_uniform_ and its twin).
__attribute__((optimize("fp-contract=off"))) void add_noise(Collected& c, const HashKey& key, float factor) {
  for (size_t t = 0; t < c.keys.size(); ++t) {
    const int64_t i = c.positions[t];
    const float noise = hashed_uniform_value(i, key.key0, key.high(i)) * factor;
    c.keys[t] = c.keys[t] + noise;
  }
}

__attribute__((optimize("fp-contract=off"))) float noise_bound(float threshold, float factor) {
  return threshold + factor;
}

at::Tensor grow_select(const c10::optional<at::Tensor>& dense, const c10::optional<at::Tensor>& dy,
                       const c10::optional<at::Tensor>& x, int64_t rows, int64_t cols, const at::Tensor& excluded,
                       int64_t n, int64_t seed, double tie_noise, bool random, int64_t block_entries,
                       const c10::optional<at::Tensor>& dense_rows) {
  const char* op = "sparseapps::grow_select";
  TORCH_CHECK(block_entries >= 1, op, ": expected block_entries >= 1, got ", block_entries);
  TORCH_CHECK(rows >= 0 && cols >= 0, op, ": expected a non-negative shape, got [", rows, ", ", cols, "]");
  TORCH_CHECK(seed >= 0, op, ": expected seed >= 0, got ", seed);
  TORCH_CHECK(excluded.device().is_cpu() && excluded.scalar_type() == at::kLong && excluded.dim() == 1, op,
              ": expected 1-D int64 CPU excluded positions, got ", excluded.scalar_type(), " ", excluded.sizes());
  GrowSource source;
  source.cols = cols;
  source.random = random;
  at::Tensor dense_c, rows_c;
  if (!random) {
    if (dense.has_value()) {
      int64_t held_rows = rows;
      if (dense_rows.has_value()) {
        rows_c = dense_rows->contiguous();
        TORCH_CHECK(rows_c.device().is_cpu() && rows_c.scalar_type() == at::kLong && rows_c.dim() == 1, op,
                    ": expected 1-D int64 CPU dense_rows, got ", rows_c.scalar_type(), " ", rows_c.sizes());
        source.rows_only = true;
        source.dense_rows = rows_c.data_ptr<int64_t>();
        source.n_dense_rows = held_rows = rows_c.numel();
        for (int64_t k = 0; k < held_rows; ++k) {
          const int64_t r = source.dense_rows[k];
          TORCH_CHECK(0 <= r && r < rows && (k == 0 || source.dense_rows[k - 1] < r), op, ": dense row ", r,
                      " at ", k, " is outside [0, ", rows, ") or not ascending");
        }
      }
      dense_c = dense->contiguous();
      TORCH_CHECK(dense_c.device().is_cpu() && dense_c.scalar_type() == at::kFloat &&
                      dense_c.numel() == held_rows * cols,
                  op, ": expected a float32 CPU dense gradient of ", held_rows, " x ", cols, " entries, got ",
                  dense_c.scalar_type(), " ", dense_c.sizes());
      static const float kNoRows = 0.0f;  // an empty tensor's data pointer is null, which means "no dense"
      source.dense = dense_c.numel() > 0 ? dense_c.data_ptr<float>() : &kNoRows;
    } else {
      TORCH_CHECK(dy.has_value() && x.has_value(), op, ": expected a dense gradient or its factors dy and x");
      source.dy = dy->contiguous();
      source.x = x->contiguous();
      TORCH_CHECK(source.dy.scalar_type() == at::kFloat && source.x.scalar_type() == at::kFloat &&
                      source.dy.device().is_cpu() && source.x.device().is_cpu() && source.dy.dim() == 2 &&
                      source.x.dim() == 2 && source.dy.size(1) == rows && source.x.size(1) == cols &&
                      source.dy.size(0) == source.x.size(0),
                  op, ": expected float32 CPU factors dy [B, ", rows, "] and x [B, ", cols, "], got ",
                  source.dy.sizes(), " and ", source.x.sizes());
      source.dy_t = source.dy.t().contiguous();  // the threshold's samples read a row of each, not a strided column
      source.x_t = source.x.t().contiguous();
    }
  }
  const at::Tensor ex = excluded.contiguous();
  const int64_t* ep = ex.data_ptr<int64_t>();
  const int64_t n_excluded = ex.numel();
  const int64_t size = rows * cols;
  for (int64_t k = 0; k < n_excluded; ++k) {
    TORCH_CHECK(0 <= ep[k] && ep[k] < size && (k == 0 || ep[k - 1] < ep[k]), op, ": excluded position ", ep[k],
                " at ", k, " is outside [0, ", size, ") or not ascending");
  }
  const int64_t available = size - n_excluded;
  TORCH_CHECK(0 <= n && n <= available, op, ": cannot select ", n, " entries from ", available, " candidates");
  at::Tensor out = at::empty({n}, ex.options());
  if (n == 0) return out;
  const HashKey key(seed);
  // A dense gradient is read once for its largest |g| (the tie-noise scale), so that the scan can then threshold
  // the exact scores: with many equal gradients (an embedding table's rows not looked up are all 0) a threshold on
  // |g| alone would let every tie through.
  if (source.dense != nullptr && tie_noise > 0) {
    float m = 0.0f;  // the rows left out are 0
    const int64_t held = source.rows_only ? source.n_dense_rows * cols : size;
    for (int64_t i = 0; i < held; ++i) m = std::max(m, std::fabs(source.dense[i]));
    source.exact_factor = (m == 0.0f ? 1.0f : m) * static_cast<float>(tie_noise);
  } else if (source.dense != nullptr) {
    source.exact_factor = 0.0f;
  }
  const bool exact = random || source.exact_factor >= 0.0f;
  // Thresholds from a sample of the candidates keep ~1.3n (then ~8n) of them; noise is ignored there, and the result
  // is checked below: with too few passing, the next threshold is tried, the last being none.
  std::vector<float> thresholds;
  if (size >= (int64_t{1} << 16) && 4 * n < available) {
    // One position in each of 2^14 equal strides, jittered by a hash so that it does not align with the columns.
    const int64_t stride = std::max<int64_t>(1, size / (int64_t{1} << 14));
    std::vector<float> sample;
    for (int64_t i0 = 0; i0 < size; i0 += stride) {
      const int64_t i = std::min(size - 1, i0 + static_cast<int64_t>(fmix32(static_cast<uint32_t>(i0 / stride) + 1u) %
                                                                     static_cast<uint32_t>(stride)));
      if (std::binary_search(ep, ep + n_excluded, i)) continue;
      float value = 0.0f;
      const float g = exact && !random ? source.dense_value(i) : 0.0f;
      if (exact) exact_scores(random ? nullptr : &g, i, 1, key, source.exact_factor, &value);
      sample.push_back(exact ? value : source.sample(i));
    }
    for (const double factor : {1.3, 8.0}) {
      // At least ~24 * factor sample points above the threshold: for a few growths among millions of candidates
      // a quantile of fewer would often keep too few and cost a second scan.
      const double share = factor * std::max(static_cast<double>(n) / static_cast<double>(available),
                                             24.0 / static_cast<double>(sample.size()));
      if (sample.size() <= 256 || share >= 0.5) break;
      int64_t rank = static_cast<int64_t>(std::llround(static_cast<double>(sample.size()) * (1.0 - share)));
      rank = std::min<int64_t>(std::max<int64_t>(rank, 1), static_cast<int64_t>(sample.size())) - 1;
      std::nth_element(sample.begin(), sample.begin() + rank, sample.end());
      thresholds.push_back(sample[static_cast<size_t>(rank)]);
    }
  }
  thresholds.push_back(-std::numeric_limits<float>::infinity());
  Collected c;
  for (const float threshold : thresholds) {
    c = collect_all(source, rows, ep, n_excluded, key, threshold, block_entries);
    if (exact) {  // every candidate left out scores below the threshold
      if (static_cast<int64_t>(c.keys.size()) >= n) break;
      continue;
    }
    float factor = 0.0f;
    if (tie_noise > 0) {
      const float magnitude = c.max_abs == 0.0f ? 1.0f : c.max_abs;
      factor = magnitude * static_cast<float>(tie_noise);
      add_noise(c, key, factor);
    }
    // Every candidate left out scores below threshold + factor (|g| < threshold, noise < factor): the n best are
    // among the collected ones if n of them score above that.
    const float bound = noise_bound(threshold, factor);
    int64_t above = 0;
    for (float k : c.keys) above += static_cast<int64_t>(k > bound);
    if (above >= n) break;
  }
  const int64_t count = static_cast<int64_t>(c.keys.size());
  TORCH_CHECK(count >= n, op, ": internal error, ", count, " candidates collected for ", n);
  // Best first: higher score, then lower position. The n best are the scores above the n-th best score `kth` and,
  // of those equal to it, the `ties` lowest positions: read off the collected ones, which ascend by position, so the
  // result needs no sort (a selection over the scores alone, not over (score, position) pairs).
  float kth = -std::numeric_limits<float>::infinity();
  int64_t ties = n;
  if (count > n) {
    std::vector<float> keys(c.keys.begin(), c.keys.end());
    std::nth_element(keys.begin(), keys.begin() + (n - 1), keys.end(), std::greater<float>());
    kth = keys[static_cast<size_t>(n - 1)];
    int64_t above = 0;
    for (const float key : c.keys) above += static_cast<int64_t>(key > kth);
    ties = n - above;
  }
  int64_t* o = out.data_ptr<int64_t>();
  int64_t k = 0;
  for (int64_t t = 0; t < count && k < n; ++t) {
    const float key = c.keys[static_cast<size_t>(t)];
    if (key > kth || (key == kth && ties-- > 0)) o[k++] = c.positions[static_cast<size_t>(t)];
  }
  TORCH_CHECK(k == n, op, ": internal error, ", k, " entries selected for ", n);
  return out;
}

at::Tensor sorted_index(const at::Tensor& haystack, const at::Tensor& needles) {
  const char* op = "sparseapps::sorted_index";
  for (const at::Tensor* t : {&haystack, &needles}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1, op,
                ": expected 1-D int64 CPU positions, got ", t->scalar_type(), " ", t->sizes());
  }
  const at::Tensor h = haystack.contiguous(), q = needles.contiguous();
  const int64_t nh = h.numel(), nq = q.numel();
  at::Tensor out = at::empty({nq}, q.options());
  const int64_t* hp = h.data_ptr<int64_t>();
  const int64_t* qp = q.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  int64_t i = 0;
  for (int64_t j = 0; j < nq; ++j) {
    TORCH_CHECK(j == 0 || qp[j - 1] < qp[j], op, ": needles are not ascending at ", j);
    while (i < nh && hp[i] < qp[j]) ++i;
    o[j] = (i < nh && hp[i] == qp[j]) ? i : -1;
  }
  return out;
}

std::vector<at::Tensor> merge_positions(const at::Tensor& kept, const at::Tensor& grown) {
  const char* op = "sparseapps::merge_positions";
  for (const at::Tensor* t : {&kept, &grown}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1, op,
                ": expected 1-D int64 CPU positions, got ", t->scalar_type(), " ", t->sizes());
  }
  const at::Tensor a = kept.contiguous(), b = grown.contiguous();
  const int64_t na = a.numel(), nb = b.numel();
  at::Tensor merged = at::empty({na + nb}, a.options());
  at::Tensor slots = at::empty({na}, a.options());
  const int64_t* ap = a.data_ptr<int64_t>();
  const int64_t* bp = b.data_ptr<int64_t>();
  int64_t* m = merged.data_ptr<int64_t>();
  int64_t* s = slots.data_ptr<int64_t>();
  int64_t i = 0, j = 0, k = 0;
  while (i < na || j < nb) {
    if (j == nb || (i < na && ap[i] < bp[j])) {
      TORCH_CHECK(i == 0 || ap[i - 1] < ap[i], op, ": kept positions are not ascending at ", i);
      s[i] = k;
      m[k++] = ap[i++];
    } else {
      TORCH_CHECK(i == na || ap[i] != bp[j], op, ": position ", bp[j], " is both kept and grown");
      TORCH_CHECK(j == 0 || bp[j - 1] < bp[j], op, ": grown positions are not ascending at ", j);
      m[k++] = bp[j++];
    }
  }
  return {merged, slots};
}

}  // namespace
}  // namespace sparseapps

TORCH_LIBRARY_FRAGMENT(sparseapps, m) {
  m.def("hashed_uniform_at(int seed, Tensor positions) -> Tensor", &sparseapps::hashed_uniform_at);
  m.def(
      "grow_select(Tensor? dense, Tensor? dy, Tensor? x, int rows, int cols, Tensor excluded, int n, int seed, "
      "float tie_noise, bool random, int block_entries=262144, Tensor? dense_rows=None) -> Tensor",
      &sparseapps::grow_select);
  m.def("merge_positions(Tensor kept, Tensor grown) -> Tensor[]", &sparseapps::merge_positions);
  m.def("sorted_index(Tensor haystack, Tensor needles) -> Tensor", &sparseapps::sorted_index);
}
