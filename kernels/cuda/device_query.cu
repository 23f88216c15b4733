// CUDA side of backend_info.hpp: lists the visible GPUs. Compiled only with DSV3_ENABLE_CUDA=ON.
#include <cuda_runtime.h>

#include "backend_info.hpp"

namespace dsv3 {

bool cuda_enabled() { return true; }

std::vector<GpuInfo> cuda_devices() {
  std::vector<GpuInfo> out;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: report none
    return out;
  }
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    GpuInfo g;
    g.index = i;
    g.name = p.name;
    g.memory_gb = double(p.totalGlobalMem) / double(1ull << 30);  // GiB, as configs count
    g.sm_major = p.major;
    g.sm_minor = p.minor;
    out.push_back(g);
  }
  return out;
}

}  // namespace dsv3
