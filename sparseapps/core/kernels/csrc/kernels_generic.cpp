// Portable kernels at the compiler's baseline instruction set: the fallback on any CPU.
#include <cstdint>

#include "kernels.h"

#define SPARSEAPPS_PORTABLE_NS generic_isa
#include "kernels_portable.h"

namespace sparseapps {
KernelTable generic_kernels() {
  using namespace generic_isa;
  return KernelTable{"generic", &gather_entry, &blocked_entry, &tile_entry, &pack_entry, &unpack_entry,
                     &sddmm_gather_entry, &sddmm_tile_entry};
}
}  // namespace sparseapps
