// Lazy Kokkos initialisation for the host backend.
#include "host/host_common.hpp"

#include <cstdlib>
#include <mutex>

#include "core/error.hpp"

namespace dsv3::host {

void check_host(const char* op, const Tensor& t) {
  DSV3_CHECK(t.device() == Device::Host, op, ": tensor '", t.name(),
             "' is on a device without a backend in this build (only host)");
}

void check_f32_host(const char* op, const Tensor& t) {
  expect_dtype(op, t, DType::F32);
  check_host(op, t);
}

void ensure_kokkos() {
#ifdef DSV3_HAVE_KOKKOS
  static std::once_flag once;
  std::call_once(once, [] {
    if (!Kokkos::is_initialized()) {
      Kokkos::initialize();
      std::atexit([] {
        if (Kokkos::is_initialized()) Kokkos::finalize();
      });
    }
  });
#endif
}

}  // namespace dsv3::host
