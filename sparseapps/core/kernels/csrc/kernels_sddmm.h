// SDDMM row loops, shared by the instruction-set variants. Included inside each variant's namespace after its
// inner products, which differ by instruction set:
//   float sddmm_dot(d, p, c0, c1): sum over batch columns [c0, c1) (multiples of 16) of d[c] * p[c];
//   void sddmm_dot4(d, p[4], c0, c1, out[4]): the same for four entries sharing d;
//   void sddmm_gather_row<NB, Index>(ind, length, x, ldx, dr[NB], g): g[t] = sum_b dr[b] * x[b * ldx + ind[t]].
// No include guard on purpose.

template <int NB, typename Index>
void sddmm_gather_rows(const SparseRows& rows, const float* x, int64_t ldx, const float* dy, int64_t lddy,
                       float* grad, int64_t r0, int64_t r1) {
  const Index* all_indices = static_cast<const Index*>(rows.indices);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t start, length;
    row_range(rows, r, &start, &length);
    float dr[NB];
    for (int b = 0; b < NB; ++b) dr[b] = dy[b * lddy + r];
    sddmm_gather_row<NB, Index>(all_indices + start, length, x, ldx, dr, grad + start);
  }
}

template <typename Index>
void sddmm_tile_rows(const SparseRows& rows, const float* xt, const float* dyt, int64_t ld, float* grad, int64_t r0,
                     int64_t r1, int64_t c0, int64_t c1) {
  const Index* all_indices = static_cast<const Index*>(rows.indices);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t start, length;
    row_range(rows, r, &start, &length);
    const Index* ind = all_indices + start;
    const float* d = dyt + r * ld;
    float* g = grad + start;
    int64_t t = 0;
    for (; t + 4 <= length; t += 4) {
      const float* p[4];
      for (int u = 0; u < 4; ++u) p[u] = xt + static_cast<int64_t>(ind[t + u]) * ld;
      float sums[4];
      sddmm_dot4(d, p, c0, c1, sums);
      for (int u = 0; u < 4; ++u) g[t + u] += sums[u];
    }
    for (; t < length; ++t) g[t] += sddmm_dot(d, xt + static_cast<int64_t>(ind[t]) * ld, c0, c1);
  }
}

template <typename Index>
void sddmm_gather_dispatch(const SparseRows& rows, const float* x, int64_t ldx, const float* dy, int64_t lddy,
                           int64_t n_batch, float* grad, int64_t r0, int64_t r1) {
  switch (n_batch) {
    case 1: sddmm_gather_rows<1, Index>(rows, x, ldx, dy, lddy, grad, r0, r1); break;
    case 2: sddmm_gather_rows<2, Index>(rows, x, ldx, dy, lddy, grad, r0, r1); break;
    case 3: sddmm_gather_rows<3, Index>(rows, x, ldx, dy, lddy, grad, r0, r1); break;
    default: sddmm_gather_rows<4, Index>(rows, x, ldx, dy, lddy, grad, r0, r1); break;
  }
}

void sddmm_gather_entry(const SparseRows& rows, const float* x, int64_t ldx, const float* dy, int64_t lddy,
                        int64_t n_batch, float* grad, int64_t r0, int64_t r1) {
  if (rows.index16) sddmm_gather_dispatch<int16_t>(rows, x, ldx, dy, lddy, n_batch, grad, r0, r1);
  else sddmm_gather_dispatch<int32_t>(rows, x, ldx, dy, lddy, n_batch, grad, r0, r1);
}

void sddmm_tile_entry(const SparseRows& rows, const float* xt, const float* dyt, int64_t ld, float* grad, int64_t r0,
                      int64_t r1, int64_t c0, int64_t c1) {
  if (rows.index16) sddmm_tile_rows<int16_t>(rows, xt, dyt, ld, grad, r0, r1, c0, c1);
  else sddmm_tile_rows<int32_t>(rows, xt, dyt, ld, grad, r0, r1, c0, c1);
}
