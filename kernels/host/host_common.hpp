// Shared pieces of the host backend: the Kokkos execution space and view typedefs (unmanaged views
// over Tensor memory), lazy Kokkos initialisation, and range helpers. Every parallel_for is labelled
// "dsv3::<op>".
#pragma once

#include <cstdint>

#include "core/tensor.hpp"
#include "cuda/cuda_ops.hpp"

#ifdef DSV3_HAVE_KOKKOS
#include <Kokkos_Core.hpp>
#endif

namespace dsv3::host {

#ifdef DSV3_HAVE_KOKKOS
using ExecSpace = Kokkos::DefaultHostExecutionSpace;
using Range = Kokkos::RangePolicy<ExecSpace>;
using Unmanaged = Kokkos::MemoryTraits<Kokkos::Unmanaged>;
using ViewF1 = Kokkos::View<float*, Kokkos::HostSpace, Unmanaged>;
using ViewF2 = Kokkos::View<float**, Kokkos::LayoutRight, Kokkos::HostSpace, Unmanaged>;
using ViewI1 = Kokkos::View<int32_t*, Kokkos::HostSpace, Unmanaged>;
using ViewI2 = Kokkos::View<int32_t**, Kokkos::LayoutRight, Kokkos::HostSpace, Unmanaged>;
#endif

// Precondition checks shared by every host op: the tensor lives in host memory (and is f32).
void check_host(const char* op, const Tensor& t);
void check_f32_host(const char* op, const Tensor& t);

// Ops with a CUDA twin (kernels/cuda/<op>.cu) check shapes and dtypes here, device-neutrally, then
// hand GPU tensors to the twin:
//   if constexpr (host::kCuda)
//     if (host::on_cuda(op, {&x, &y})) return cuda::op(x, y);
// kCuda is false in builds without the backend, where the twins are not compiled (the call is then
// a discarded statement) and check_backend refuses GPU tensors.
#ifdef DSV3_HAVE_CUDA
inline constexpr bool kCuda = true;
#else
inline constexpr bool kCuda = false;
#endif
// The tensor lives on the host, or on the GPU in a build with the CUDA backend.
void check_backend(const char* op, const Tensor& t);
void check_f32_backend(const char* op, const Tensor& t);
// True when the op's (non-empty) tensors are on the GPU, false when on the host; throws naming the
// op and the tensors when they are on different devices.
bool on_cuda(const char* op, std::initializer_list<const Tensor*> tensors);
// The tensor is a matrix (2 dimensions).
void check_2d(const char* op, const Tensor& t);

// An op input that may be stored in bf16 (compute weights, saved activations under bf16 mixed
// precision), read as f32: the tensor's own data when it is f32, otherwise an exact f32 copy that
// lives as long as this object. `view` has the tensor's shape, name and f32 dtype.
class F32Input {
 public:
  F32Input(const char* op, const Tensor& t);
  const Tensor& view() const { return view_; }
  const float* data() const { return view_.f32(); }
  operator const Tensor&() const { return view_; }

 private:
  OwnedTensor copy_;
  Tensor view_;
};

// Initialises Kokkos on first use (and finalises it at exit) so library users need no set-up.
void ensure_kokkos();

// Runs body(i) for i in [0, n) on the host execution space under `label`.
template <typename F>
void parallel_for(const char* label, int64_t n, const F& body) {
#ifdef DSV3_HAVE_KOKKOS
  ensure_kokkos();
  Kokkos::parallel_for(label, Range(0, n), body);
#else
  (void)label;
  for (int64_t i = 0; i < n; ++i) body(i);
#endif
}

}  // namespace dsv3::host
