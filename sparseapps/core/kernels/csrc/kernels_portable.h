// Portable kernels: plain C++ that the compiler vectorizes. Included by kernels_generic.cpp (baseline
// flags) and kernels_avx2.cpp (under an AVX2 + FMA target pragma), each inside its own namespace, so
// nothing here may be an out-of-line symbol shared between the two translation units.
// Expects SPARSEAPPS_PORTABLE_NS to name the enclosing namespace.

namespace sparseapps {
namespace SPARSEAPPS_PORTABLE_NS {
namespace {

inline float scalar_value(const float* p) { return *p; }
inline float scalar_value(const uint16_t* p) { return bf16_to_float(*p); }

inline void row_range(const SparseRows& rows, int64_t r, int64_t* start, int64_t* length) {
  if (rows.row_ptr != nullptr) {
    *start = rows.row_ptr[r];
    *length = rows.row_ptr[r + 1] - rows.row_ptr[r];
  } else {
    *start = r * rows.row_len;
    *length = rows.row_len;
  }
}

inline int64_t out_row(const SparseRows& rows, int64_t r) { return rows.out_row != nullptr ? rows.out_row[r] : r; }

template <int NB, typename Index, typename Value>
void gather_rows(const SparseRows& rows, const float* x, int64_t ldx, float* yt, int64_t r0, int64_t r1) {
  const Index* all_indices = static_cast<const Index*>(rows.indices);
  const Value* all_values = static_cast<const Value*>(rows.values);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t start, length;
    row_range(rows, r, &start, &length);
    const Index* ind = all_indices + start;
    const Value* val = all_values + start;
    float acc[NB][4] = {};
    int64_t t = 0;
    for (; t + 4 <= length; t += 4) {
      for (int u = 0; u < 4; ++u) {
        const int64_t j = ind[t + u];
        const float w = scalar_value(val + t + u);
        for (int b = 0; b < NB; ++b) acc[b][u] += w * x[b * ldx + j];
      }
    }
    for (; t < length; ++t) {
      const int64_t j = ind[t];
      const float w = scalar_value(val + t);
      for (int b = 0; b < NB; ++b) acc[b][0] += w * x[b * ldx + j];
    }
    float* out = yt + out_row(rows, r) * NB;
    for (int b = 0; b < NB; ++b) out[b] = (acc[b][0] + acc[b][1]) + (acc[b][2] + acc[b][3]);
  }
}

template <int NB, typename Value>
void blocked_groups(const BlockedRows& br, const float* x, int64_t ldx, float* yt, int64_t g0, int64_t g1) {
  const Value* values = static_cast<const Value*>(br.values);
  const int64_t width = br.n_groups * kLanes;
  for (int64_t g = g0; g < g1; ++g) {
    float acc[NB][kLanes] = {};
    for (int64_t s = br.group_ptr[g]; s < br.group_ptr[g + 1]; ++s) {
      const Value* val = values + s * kLanes;
      const uint8_t* lane = br.lanes + s * kLanes;
      const int64_t lo = static_cast<int64_t>(br.chunks[2 * s]) * kChunk;
      const int64_t hi = static_cast<int64_t>(br.chunks[2 * s + 1]) * kChunk;
      for (int b = 0; b < NB; ++b) {
        const float* xb = x + b * ldx;
        for (int l = 0; l < kLanes; ++l) {
          const int p = lane[l];
          const float a = xb[(p & 16 ? hi : lo) + (p & 15)];
          acc[b][l] += scalar_value(val + l) * a;
        }
      }
    }
    for (int b = 0; b < NB; ++b) {
      for (int l = 0; l < kLanes; ++l) yt[b * width + g * kLanes + l] = acc[b][l];
    }
  }
}

template <int W, typename Index, typename Value>
void tile_rows(const SparseRows& rows, const float* xt, int64_t ldxt, float* yt, int64_t r0, int64_t r1, int64_t c) {
  const Index* all_indices = static_cast<const Index*>(rows.indices);
  const Value* all_values = static_cast<const Value*>(rows.values);
  const float* base = xt + c;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t start, length;
    row_range(rows, r, &start, &length);
    const Index* ind = all_indices + start;
    const Value* val = all_values + start;
    float acc0[W] = {};
    float acc1[W] = {};
    int64_t t = 0;
    for (; t + 2 <= length; t += 2) {
      const float* p0 = base + static_cast<int64_t>(ind[t]) * ldxt;
      const float* p1 = base + static_cast<int64_t>(ind[t + 1]) * ldxt;
      const float w0 = scalar_value(val + t);
      const float w1 = scalar_value(val + t + 1);
      for (int v = 0; v < W; ++v) {
        acc0[v] += w0 * p0[v];
        acc1[v] += w1 * p1[v];
      }
    }
    if (t < length) {
      const float* p0 = base + static_cast<int64_t>(ind[t]) * ldxt;
      const float w0 = scalar_value(val + t);
      for (int v = 0; v < W; ++v) acc0[v] += w0 * p0[v];
    }
    float* out = yt + out_row(rows, r) * ldxt + c;
    for (int v = 0; v < W; ++v) out[v] = acc0[v] + acc1[v];
  }
}

template <typename Index, typename Value>
void gather_dispatch(const SparseRows& rows, const float* x, int64_t ldx, int64_t n_batch, float* yt, int64_t r0,
                     int64_t r1) {
  switch (n_batch) {
    case 1: gather_rows<1, Index, Value>(rows, x, ldx, yt, r0, r1); break;
    case 2: gather_rows<2, Index, Value>(rows, x, ldx, yt, r0, r1); break;
    case 3: gather_rows<3, Index, Value>(rows, x, ldx, yt, r0, r1); break;
    default: gather_rows<4, Index, Value>(rows, x, ldx, yt, r0, r1); break;
  }
}

template <typename Value>
void blocked_dispatch(const BlockedRows& rows, const float* x, int64_t ldx, int64_t n_batch, float* yt, int64_t g0,
                      int64_t g1) {
  switch (n_batch) {
    case 1: blocked_groups<1, Value>(rows, x, ldx, yt, g0, g1); break;
    case 2: blocked_groups<2, Value>(rows, x, ldx, yt, g0, g1); break;
    case 3: blocked_groups<3, Value>(rows, x, ldx, yt, g0, g1); break;
    default: blocked_groups<4, Value>(rows, x, ldx, yt, g0, g1); break;
  }
}

template <typename Index, typename Value>
void tile_dispatch(const SparseRows& rows, const float* xt, int64_t ldxt, float* yt, int64_t r0, int64_t r1,
                   int64_t tile_columns) {
  int64_t c = 0;
  while (c < ldxt) {
    if (ldxt - c >= 32 && tile_columns >= 32) {
      tile_rows<32, Index, Value>(rows, xt, ldxt, yt, r0, r1, c);
      c += 32;
    } else {
      tile_rows<16, Index, Value>(rows, xt, ldxt, yt, r0, r1, c);
      c += 16;
    }
  }
}

void gather_entry(const SparseRows& rows, const float* x, int64_t ldx, int64_t n_batch, float* yt, int64_t r0,
                  int64_t r1) {
  if (rows.index16) {
    if (rows.value_bf16) gather_dispatch<int16_t, uint16_t>(rows, x, ldx, n_batch, yt, r0, r1);
    else gather_dispatch<int16_t, float>(rows, x, ldx, n_batch, yt, r0, r1);
  } else {
    if (rows.value_bf16) gather_dispatch<int32_t, uint16_t>(rows, x, ldx, n_batch, yt, r0, r1);
    else gather_dispatch<int32_t, float>(rows, x, ldx, n_batch, yt, r0, r1);
  }
}

void blocked_entry(const BlockedRows& rows, const float* x, int64_t ldx, int64_t n_batch, float* yt, int64_t g0,
                   int64_t g1) {
  if (rows.value_bf16) blocked_dispatch<uint16_t>(rows, x, ldx, n_batch, yt, g0, g1);
  else blocked_dispatch<float>(rows, x, ldx, n_batch, yt, g0, g1);
}

void tile_entry(const SparseRows& rows, const float* xt, int64_t ldxt, float* yt, int64_t r0, int64_t r1,
                int64_t tile_columns) {
  if (rows.index16) {
    if (rows.value_bf16) tile_dispatch<int16_t, uint16_t>(rows, xt, ldxt, yt, r0, r1, tile_columns);
    else tile_dispatch<int16_t, float>(rows, xt, ldxt, yt, r0, r1, tile_columns);
  } else {
    if (rows.value_bf16) tile_dispatch<int32_t, uint16_t>(rows, xt, ldxt, yt, r0, r1, tile_columns);
    else tile_dispatch<int32_t, float>(rows, xt, ldxt, yt, r0, r1, tile_columns);
  }
}

void pack_entry(const float* x, int64_t n, int64_t in, float* xt, int64_t ldxt, int64_t i0, int64_t i1) {
  constexpr int64_t kBlock = 16;
  for (int64_t i = i0; i < i1; i += kBlock) {
    const int64_t i_end = i + kBlock < i1 ? i + kBlock : i1;
    for (int64_t b0 = 0; b0 < ldxt; b0 += kBlock) {
      for (int64_t k = i; k < i_end; ++k) {
        float* dst = xt + k * ldxt + b0;
        for (int64_t b = 0; b < kBlock; ++b) dst[b] = b0 + b < n ? x[(b0 + b) * in + k] : 0.0f;
      }
    }
  }
}

void unpack_entry(const float* yt, int64_t ldyt, int64_t out, const float* bias, float* y, int64_t b0, int64_t b1) {
  constexpr int64_t kBlock = 16;
  for (int64_t b = b0; b < b1; b += kBlock) {
    const int64_t b_end = b + kBlock < b1 ? b + kBlock : b1;
    for (int64_t o = 0; o < out; o += kBlock) {
      const int64_t o_end = o + kBlock < out ? o + kBlock : out;
      for (int64_t k = b; k < b_end; ++k) {
        float* dst = y + k * out;
        for (int64_t j = o; j < o_end; ++j) dst[j] = yt[j * ldyt + k] + (bias != nullptr ? bias[j] : 0.0f);
      }
    }
  }
}

// ---- SDDMM: the weight gradient on the active entries (row loops in kernels_sddmm.h) -------------------
inline float sddmm_dot(const float* d, const float* p, int64_t c0, int64_t c1) {
  float acc[kLanes] = {};
  for (int64_t c = c0; c < c1; c += kLanes) {
    for (int v = 0; v < kLanes; ++v) acc[v] += d[c + v] * p[c + v];
  }
  float sum = 0.0f;
  for (int v = 0; v < kLanes; ++v) sum += acc[v];
  return sum;
}

inline void sddmm_dot4(const float* d, const float* const p[4], int64_t c0, int64_t c1, float out[4]) {
  for (int u = 0; u < 4; ++u) out[u] = sddmm_dot(d, p[u], c0, c1);
}

template <int NB, typename Index>
inline void sddmm_gather_row(const Index* ind, int64_t length, const float* x, int64_t ldx, const float* dr,
                             float* g) {
  for (int64_t t = 0; t < length; ++t) {
    const int64_t j = ind[t];
    float acc = 0.0f;
    for (int b = 0; b < NB; ++b) acc += dr[b] * x[b * ldx + j];
    g[t] = acc;
  }
}

#include "kernels_sddmm.h"

}  // namespace
}  // namespace SPARSEAPPS_PORTABLE_NS
}  // namespace sparseapps
