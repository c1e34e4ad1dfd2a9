// Portable kernels compiled for AVX2 + FMA; ops.cpp calls them only when the CPU reports both.
#include <cstdint>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SPARSEAPPS_PORTABLE_NS avx2_isa
#include "kernels_portable.h"
#pragma GCC pop_options

namespace sparseapps {
KernelTable avx2_kernels() {
  using namespace avx2_isa;
  return KernelTable{"avx2", &gather_entry, &blocked_entry, &tile_entry, &pack_entry, &unpack_entry,
                     &sddmm_gather_entry, &sddmm_tile_entry};
}
}  // namespace sparseapps
