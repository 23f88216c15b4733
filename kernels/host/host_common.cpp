// Lazy Kokkos initialisation for the host backend.
#include "host/host_common.hpp"

#include <cstdlib>
#include <mutex>

#include "core/device.hpp"
#include "core/error.hpp"
#include "core/lowp.hpp"

namespace dsv3::host {

void check_host(const char* op, const Tensor& t) {
  DSV3_CHECK(t.device() == Device::Host, op, ": tensor '", t.name(),
             "' is on a device without a backend in this build (only host)");
}

void check_f32_host(const char* op, const Tensor& t) {
  expect_dtype(op, t, DType::F32);
  check_host(op, t);
}

void check_backend(const char* op, const Tensor& t) {
  DSV3_CHECK(t.device() == Device::Host || (kCuda && t.device() == Device::Cuda), op, ": tensor '", t.name(),
             "' is on a device without a backend in this build (only host)");
}

void check_f32_backend(const char* op, const Tensor& t) {
  expect_dtype(op, t, DType::F32);
  check_backend(op, t);
}

bool on_cuda(const char* op, std::initializer_list<const Tensor*> tensors) {
  const Tensor* first = nullptr;
  for (const Tensor* t : tensors) {
    if (t->empty()) continue;
    check_backend(op, *t);
    if (first == nullptr) {
      first = t;
    } else {
      DSV3_CHECK(t->device() == first->device(), op, ": tensor '", t->name(), "' is on ",
                 device_name(t->device()), " but '", first->name(), "' on ", device_name(first->device()),
                 "; an op takes all its tensors on one device");
    }
  }
  return first != nullptr && first->device() == Device::Cuda;
}

void check_2d(const char* op, const Tensor& t) {
  DSV3_CHECK(t.ndim() == 2, op, ": tensor '", t.name(), "' has shape ", t.shape_str(),
             ", expected 2 dimensions");
}

F32Input::F32Input(const char* op, const Tensor& t) {
  check_host(op, t);
  if (t.dtype() == DType::F32) {
    view_ = t;
    return;
  }
  DSV3_CHECK(t.dtype() == DType::BF16, op, ": tensor '", t.name(), "' has dtype ", dtype_name(t.dtype()),
             ", expected f32 or bf16");
  copy_ = OwnedTensor(DType::F32, t.shape(), t.name(), Device::Host, Fill::Uninitialized);
  lowp::from_bf16(static_cast<const uint16_t*>(t.data()), copy_.f32(), t.numel());
  view_ = copy_.t;
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
