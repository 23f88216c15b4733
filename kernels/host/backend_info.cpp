// Host side of backend_info.hpp; the CUDA device query lives in cuda/device_query.cu.
#include "backend_info.hpp"

#ifdef DSV3_HAVE_KOKKOS
#include <Kokkos_Core.hpp>
#endif

namespace dsv3 {

std::string host_backend_description() {
  std::string s;
#ifdef DSV3_HAVE_KOKKOS
  s = "Kokkos " + std::to_string(KOKKOS_VERSION / 10000) + "." + std::to_string(KOKKOS_VERSION / 100 % 100) +
      " (" + Kokkos::DefaultHostExecutionSpace::name() + ")";
#else
  s = "plain C++ loops";
#endif
  return s + ", CBLAS";
}

#ifndef DSV3_HAVE_CUDA
bool cuda_enabled() { return false; }
std::vector<GpuInfo> cuda_devices() { return {}; }
#endif

}  // namespace dsv3
