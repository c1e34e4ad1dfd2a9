// AVX-512 kernels (F + BW + VL + DQ). Compiled under a target pragma so the rest of the library stays
// portable; ops.cpp calls them only when the CPU reports these features at run time.
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,bmi,bmi2,popcnt")

namespace sparseapps {
namespace {

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

inline __m512i load_index(const int16_t* p) {
  return _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512i load_index(const int32_t* p) { return _mm512_loadu_si512(p); }
inline __m512i load_index(const int16_t* p, __mmask16 m) { return _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512i load_index(const int32_t* p, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, p); }

inline __m512 load_value(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_value(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load_value(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_value(const uint16_t* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

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

// 16 x 16 transpose in registers: r[k] holds row k on entry and column k on exit.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  __m512 out[16];
  for (int j = 0; j < 4; ++j) {
    const __m512 u0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    const __m512 u1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    const __m512 u3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    out[j] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    out[8 + j] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    out[4 + j] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    out[12 + j] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
  for (int k = 0; k < 16; ++k) r[k] = out[k];
}

// ---- gather path: 16 nonzeros per hardware gather, two chains --------------------------------------
template <int NB, typename Index, typename Value>
void gather_rows(const SparseRows& rows, const float* x, int64_t ldx, float* yt, int64_t r0, int64_t r1) {
  const Index* all_indices = static_cast<const Index*>(rows.indices);
  const Value* all_values = static_cast<const Value*>(rows.values);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t start, length;
    row_range(rows, r, &start, &length);
    const Index* ind = all_indices + start;
    const Value* val = all_values + start;
    __m512 acc0[NB], acc1[NB];
    for (int b = 0; b < NB; ++b) {
      acc0[b] = _mm512_setzero_ps();
      acc1[b] = _mm512_setzero_ps();
    }
    int64_t t = 0;
    for (; t + 32 <= length; t += 32) {
      const __m512i i0 = load_index(ind + t);
      const __m512i i1 = load_index(ind + t + 16);
      const __m512 v0 = load_value(val + t);
      const __m512 v1 = load_value(val + t + 16);
      for (int b = 0; b < NB; ++b) {
        acc0[b] = _mm512_fmadd_ps(v0, _mm512_i32gather_ps(i0, x + b * ldx, 4), acc0[b]);
        acc1[b] = _mm512_fmadd_ps(v1, _mm512_i32gather_ps(i1, x + b * ldx, 4), acc1[b]);
      }
    }
    for (; t < length; t += 16) {
      const __mmask16 m = tail_mask(length - t);
      const __m512i i0 = load_index(ind + t, m);
      const __m512 v0 = load_value(val + t, m);
      for (int b = 0; b < NB; ++b) {
        const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, x + b * ldx, 4);
        acc0[b] = _mm512_fmadd_ps(v0, g, acc0[b]);
      }
    }
    float* out = yt + out_row(rows, r) * NB;
    for (int b = 0; b < NB; ++b) out[b] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[b], acc1[b]));
  }
}

// ---- lane-blocked path: one register permute looks up 16 inputs at once --------------------------
template <int NB, typename Value>
inline void blocked_step(const float* x, int64_t ldx, const Value* val, const uint8_t* lane, const int16_t* chunk,
                         __m512 acc[NB]) {
  const __m512i p = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lane)));
  const __m512 w = load_value(val);
  const float* lo = x + static_cast<int64_t>(chunk[0]) * kChunk;
  const float* hi = x + static_cast<int64_t>(chunk[1]) * kChunk;
  for (int b = 0; b < NB; ++b) {
    const __m512 table = _mm512_permutex2var_ps(_mm512_loadu_ps(lo + b * ldx), p, _mm512_loadu_ps(hi + b * ldx));
    acc[b] = _mm512_fmadd_ps(w, table, acc[b]);
  }
}

// Four accumulators per batch element keep four FMA chains in flight (an FMA's latency is four cycles).
template <int NB, typename Value>
void blocked_groups(const BlockedRows& br, const float* x, int64_t ldx, float* yt, int64_t g0, int64_t g1) {
  const Value* values = static_cast<const Value*>(br.values);
  const int64_t width = br.n_groups * kLanes;
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[4][NB];
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < NB; ++b) acc[a][b] = _mm512_setzero_ps();
    }
    int64_t s = br.group_ptr[g];
    const int64_t end = br.group_ptr[g + 1];
    for (; s + 4 <= end; s += 4) {
      for (int a = 0; a < 4; ++a) {
        blocked_step<NB, Value>(x, ldx, values + (s + a) * kLanes, br.lanes + (s + a) * kLanes, br.chunks + 2 * (s + a),
                                acc[a]);
      }
    }
    for (; s < end; ++s) blocked_step<NB, Value>(x, ldx, values + s * kLanes, br.lanes + s * kLanes, br.chunks + 2 * s, acc[0]);
    for (int b = 0; b < NB; ++b) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0][b], acc[1][b]), _mm512_add_ps(acc[2][b], acc[3][b]));
      _mm512_storeu_ps(yt + b * width + g * kLanes, sum);
    }
  }
}

// ---- tile path: per nonzero, one broadcast weight times 16 NV contiguous transposed activations ----
template <int NV, int U, typename Index, typename Value>
void tile_rows(const SparseRows& rows, const float* xt, int64_t ldxt, float* yt, int64_t r0, int64_t r1, int64_t c) {
  const Index* all_indices = static_cast<const Index*>(rows.indices);
  const Value* all_values = static_cast<const Value*>(rows.values);
  const float* base = xt + c;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t start, length;
    row_range(rows, r, &start, &length);
    const Index* ind = all_indices + start;
    const Value* val = all_values + start;
    __m512 acc[U][NV];
    for (int u = 0; u < U; ++u) {
      for (int v = 0; v < NV; ++v) acc[u][v] = _mm512_setzero_ps();
    }
    int64_t t = 0;
    for (; t + U <= length; t += U) {
      for (int u = 0; u < U; ++u) {
        const float* p = base + static_cast<int64_t>(ind[t + u]) * ldxt;
        const __m512 w = _mm512_set1_ps(scalar_value(val + t + u));
        for (int v = 0; v < NV; ++v) acc[u][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + 16 * v), acc[u][v]);
      }
    }
    for (; t < length; ++t) {
      const float* p = base + static_cast<int64_t>(ind[t]) * ldxt;
      const __m512 w = _mm512_set1_ps(scalar_value(val + t));
      for (int v = 0; v < NV; ++v) acc[0][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + 16 * v), acc[0][v]);
    }
    float* out = yt + out_row(rows, r) * ldxt + c;
    for (int v = 0; v < NV; ++v) {
      __m512 sum = acc[0][v];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][v]);
      _mm512_storeu_ps(out + 16 * v, sum);
    }
  }
}

// Rows are the inner loop so one column tile of xt ([in, tile_columns] floats) stays in this core's L2
// while the thread's rows stream past it once per tile.
template <typename Index, typename Value>
void tile_dispatch(const SparseRows& rows, const float* xt, int64_t ldxt, float* yt, int64_t r0, int64_t r1,
                   int64_t tile_columns) {
  int64_t c = 0;
  while (c < ldxt) {
    const int64_t left = ldxt - c;
    if (left >= 64 && tile_columns >= 64) {
      tile_rows<4, 1, Index, Value>(rows, xt, ldxt, yt, r0, r1, c);
      c += 64;
    } else if (left >= 32 && tile_columns >= 32) {
      tile_rows<2, 2, Index, Value>(rows, xt, ldxt, yt, r0, r1, c);
      c += 32;
    } else {
      tile_rows<1, 4, Index, Value>(rows, xt, ldxt, yt, r0, r1, c);
      c += 16;
    }
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
  __m512 r[16];
  for (int64_t i = i0; i < i1; i += 16) {
    const int64_t width = i1 - i < 16 ? i1 - i : 16;
    const __mmask16 cols = tail_mask(width);
    for (int64_t b0 = 0; b0 < ldxt; b0 += 16) {
      for (int64_t k = 0; k < 16; ++k) {
        r[k] = b0 + k < n ? _mm512_maskz_loadu_ps(cols, x + (b0 + k) * in + i) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int64_t k = 0; k < width; ++k) _mm512_storeu_ps(xt + (i + k) * ldxt + b0, r[k]);
    }
  }
}

void unpack_entry(const float* yt, int64_t ldyt, int64_t out, const float* bias, float* y, int64_t b0, int64_t b1) {
  __m512 r[16];
  for (int64_t b = b0; b < b1; b += 16) {
    const int64_t rows_here = b1 - b < 16 ? b1 - b : 16;
    const __mmask16 batch_mask = tail_mask(rows_here);
    for (int64_t o = 0; o < out; o += 16) {
      const int64_t width = out - o < 16 ? out - o : 16;
      const __mmask16 cols = tail_mask(width);
      for (int64_t k = 0; k < 16; ++k) {
        r[k] = k < width ? _mm512_maskz_loadu_ps(batch_mask, yt + (o + k) * ldyt + b) : _mm512_setzero_ps();
      }
      transpose16(r);
      const __m512 add = bias != nullptr ? _mm512_maskz_loadu_ps(cols, bias + o) : _mm512_setzero_ps();
      for (int64_t k = 0; k < rows_here; ++k) _mm512_mask_storeu_ps(y + (b + k) * out + o, cols, _mm512_add_ps(r[k], add));
    }
  }
}

// ---- SDDMM: the weight gradient on the active entries (row loops in kernels_sddmm.h) -------------------
inline float sddmm_dot(const float* d, const float* p, int64_t c0, int64_t c1) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = c0; c < c1; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(d + c), _mm512_loadu_ps(p + c), acc);
  return _mm512_reduce_add_ps(acc);
}

// Four entries at a time: four FMA chains share each load of d.
inline void sddmm_dot4(const float* d, const float* const p[4], int64_t c0, int64_t c1, float out[4]) {
  __m512 acc[4];
  for (int u = 0; u < 4; ++u) acc[u] = _mm512_setzero_ps();
  for (int64_t c = c0; c < c1; c += 16) {
    const __m512 dv = _mm512_loadu_ps(d + c);
    for (int u = 0; u < 4; ++u) acc[u] = _mm512_fmadd_ps(dv, _mm512_loadu_ps(p[u] + c), acc[u]);
  }
  for (int u = 0; u < 4; ++u) out[u] = _mm512_reduce_add_ps(acc[u]);
}

// 16 entries at a time, one hardware gather of their inputs per batch row.
template <int NB, typename Index>
inline void sddmm_gather_row(const Index* ind, int64_t length, const float* x, int64_t ldx, const float* dr,
                             float* g) {
  for (int64_t t = 0; t < length; t += 16) {
    const __mmask16 m = tail_mask(length - t);
    const __m512i i0 = load_index(ind + t, m);
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < NB; ++b) {
      const __m512 inputs = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, x + b * ldx, 4);
      acc = _mm512_fmadd_ps(_mm512_set1_ps(dr[b]), inputs, acc);
    }
    _mm512_mask_storeu_ps(g + t, m, acc);
  }
}

#include "kernels_sddmm.h"

}  // namespace
}  // namespace sparseapps

#pragma GCC pop_options

namespace sparseapps {
KernelTable avx512_kernels() {
  return KernelTable{"avx512", &gather_entry, &blocked_entry, &tile_entry, &pack_entry, &unpack_entry,
                     &sddmm_gather_entry, &sddmm_tile_entry};
}
}  // namespace sparseapps
