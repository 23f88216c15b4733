// Implementation of init.hpp.
#include "model/init.hpp"

#include <cmath>

namespace dsv3 {

double init_normal(uint64_t seed, const std::string& name, uint64_t j) {
  const uint64_t base = splitmix64(seed ^ fnv1a64(name));
  const double u1 = static_cast<double>(splitmix64(base + 2 * j) >> 11) * 0x1.0p-53;
  const double u2 = static_cast<double>(splitmix64(base + 2 * j + 1) >> 11) * 0x1.0p-53;
  return std::sqrt(-2.0 * std::log(1.0 - u1)) * std::cos(2.0 * M_PI * u2);
}

void init_normal_tensor(const Tensor& t, uint64_t seed, const std::string& name, double std,
                        uint64_t first_index) {
  float* p = t.f32();
  const uint64_t base = splitmix64(seed ^ fnv1a64(name));
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t j = first_index + static_cast<uint64_t>(i);
    const double u1 = static_cast<double>(splitmix64(base + 2 * j) >> 11) * 0x1.0p-53;
    const double u2 = static_cast<double>(splitmix64(base + 2 * j + 1) >> 11) * 0x1.0p-53;
    const double z = std::sqrt(-2.0 * std::log(1.0 - u1)) * std::cos(2.0 * M_PI * u2);
    p[i] = static_cast<float>(std * z);
  }
}

void fill_tensor(const Tensor& t, float value) {
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = value;
}

}  // namespace dsv3
