// Raw-pointer kernels for sparse rows times a dense activation block. No torch headers here: every
// instruction-set variant (generic, AVX2, AVX-512) is compiled from its own translation unit and picked at
// run time by ops.cpp, which owns validation, threading (at::parallel_for) and memory.
#pragma once

#include <cstdint>

namespace sparseapps {

// Sparse rows: row r holds its nonzeros at [start(r), start(r) + length(r)) of `values` / `indices`.
// Condensed layout: row_ptr == nullptr, start(r) = r * row_len, length(r) = row_len.
// CSR layout: row_ptr[r] .. row_ptr[r + 1].
// Row r's result goes to output row out_row[r] (identity when out_row == nullptr).
struct SparseRows {
  const void* values;      // float or bfloat16 bits (uint16_t), see value_bf16
  const void* indices;     // int16_t or int32_t, see index16
  const int64_t* row_ptr;  // [n_rows + 1] or nullptr
  const int64_t* out_row;  // [n_rows] or nullptr
  int64_t row_len;         // nonzeros per row when row_ptr == nullptr
  int64_t n_rows;
  bool index16;
  bool value_bf16;
};

// Lane-blocked layout for small batches: output rows are taken 16 at a time (a group, one row per SIMD
// lane). Each step of a group names two chunks of 16 inputs (held in two registers) and holds, for every
// lane, one weight and the position of its input among those 32 (bit 4 selects the second chunk), or a
// zero weight where the lane's row has nothing left in either chunk. One register permute then looks up
// 16 activations at once. Steps are stored group by group; group g owns steps [group_ptr[g], group_ptr[g+1]).
constexpr int64_t kLanes = 16;
constexpr int64_t kChunk = 16;
struct BlockedRows {
  const void* values;        // [n_steps, 16] float or bfloat16 bits
  const uint8_t* lanes;      // [n_steps, 16] position among the step's two chunks
  const int16_t* chunks;     // [n_steps, 2] chunk numbers (input = 16 * chunk + position)
  const int64_t* group_ptr;  // [n_groups + 1]
  int64_t n_groups;
  bool value_bf16;
};

constexpr int kMaxSmallBatch = 4;

// Gather path for a few batch elements (CSR / condensed rows): x is [n_batch, ldx] fp32 row-major;
// writes yt[out_row(r) * n_batch + b] for rows [r0, r1). n_batch <= kMaxSmallBatch.
using GatherFn = void (*)(const SparseRows& rows, const float* x, int64_t ldx, int64_t n_batch, float* yt,
                          int64_t r0, int64_t r1);

// Lane-blocked path: x is [n_batch, ldx] fp32 with 16 * (largest chunk + 1) <= ldx and zeros past the input;
// writes yt[b * (16 * n_groups) + 16 * g + lane] for groups [g0, g1). n_batch <= kMaxSmallBatch.
using BlockedFn = void (*)(const BlockedRows& rows, const float* x, int64_t ldx, int64_t n_batch, float* yt,
                           int64_t g0, int64_t g1);

// Tile path for larger batches: xt is [in, ldxt] fp32 (activations transposed, batch padded to a multiple
// of 16 with zeros); writes yt[out_row(r) * ldxt + c] for rows [r0, r1) and all ldxt columns, in column
// tiles of tile_columns (16, 32 or 64).
using TileFn = void (*)(const SparseRows& rows, const float* xt, int64_t ldxt, float* yt, int64_t r0, int64_t r1,
                        int64_t tile_columns);

// xt[i, b] = x[b, i] for b < n and 0 for n <= b < ldxt, for inputs i in [i0, i1) (x is [n, in]).
using PackFn = void (*)(const float* x, int64_t n, int64_t in, float* xt, int64_t ldxt, int64_t i0, int64_t i1);

// y[b, o] = yt[o, b] + bias[o] (bias may be null) for batch rows b in [b0, b1) and all o (yt is [out, ldyt]).
using UnpackFn = void (*)(const float* yt, int64_t ldyt, int64_t out, const float* bias, float* y, int64_t b0,
                          int64_t b1);

// SDDMM, the weight gradient of CSR rows on their active entries only: for every entry e of row r,
// grad[e] = sum_b dy[b, r] * x[b, indices[e]]. rows.values and rows.out_row are unused (row r is dy's column r).
// Gather path (n_batch <= kMaxSmallBatch): x is [n_batch, ldx] and dy [n_batch, lddy], fp32 row-major; writes
// grad of the entries of rows [r0, r1).
using SddmmGatherFn = void (*)(const SparseRows& rows, const float* x, int64_t ldx, const float* dy, int64_t lddy,
                               int64_t n_batch, float* grad, int64_t r0, int64_t r1);

// Tile path: xt is [in, ld] and dyt [n_rows, ld] (both transposed, batch padded with zeros to ld, a multiple of
// 16); adds the batch columns [c0, c1) (multiples of 16) to grad of the entries of rows [r0, r1).
using SddmmTileFn = void (*)(const SparseRows& rows, const float* xt, const float* dyt, int64_t ld, float* grad,
                             int64_t r0, int64_t r1, int64_t c0, int64_t c1);

struct KernelTable {
  const char* isa;
  GatherFn gather;
  BlockedFn blocked;
  TileFn tile;
  PackFn pack;
  UnpackFn unpack;
  SddmmGatherFn sddmm_gather;
  SddmmTileFn sddmm_tile;
};

KernelTable generic_kernels();
KernelTable avx2_kernels();
KernelTable avx512_kernels();

inline float bf16_to_float(uint16_t bits) {
  union {
    uint32_t u;
    float f;
  } v;
  v.u = static_cast<uint32_t>(bits) << 16;
  return v.f;
}

}  // namespace sparseapps
