// What compute backends this build has and what devices they see: the host backend (Kokkos
// execution space, BLAS library) and, in CUDA builds, the GPUs with their memory. The planner uses
// this to answer "what fits the hardware at hand".
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dsv3 {

struct GpuInfo {
  int index = 0;
  std::string name;
  double memory_gb = 0;
  int sm_major = 0, sm_minor = 0;
};

std::string host_backend_description();  // e.g. "Kokkos 3.4 (Serial), OpenBLAS"
bool cuda_enabled();                     // compiled with the CUDA backend
std::vector<GpuInfo> cuda_devices();     // empty without CUDA or without a visible GPU

}  // namespace dsv3
