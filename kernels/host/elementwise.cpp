// Element-wise and column-slice ops of kernels/ops.hpp: add_inplace, scale, zero, copy_columns and
// copy_columns_backward. Kokkos loops over elements (or rows for the column copies); GPU tensors go to
// the CUDA twin, kernels/cuda/elementwise.cu.
//   add_inplace: y += x                    (any shape, same for both)
//   scale:       y = alpha * x              (y may alias x)
//   zero:        t = 0                      (any dtype)
//   copy_columns:          dst[T, n] = src[T, col0 : col0 + n]          src [T, C]
//   copy_columns_backward: dsrc[T, col0 : col0 + n] (= or +=) ddst[T, n]
#include <cstring>

#include "core/error.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

using host::check_f32_backend;

void check_columns(const char* op, const Tensor& wide, const Tensor& narrow, int64_t col0) {
  DSV3_CHECK(wide.ndim() == 2, op, ": tensor '", wide.name(), "' has shape ", wide.shape_str(),
             ", expected 2 dimensions");
  const int64_t T = wide.dim(0), C = wide.dim(1);
  DSV3_CHECK(narrow.ndim() == 2, op, ": tensor '", narrow.name(), "' has shape ", narrow.shape_str(),
             ", expected 2 dimensions");
  expect_shape(op, narrow, {T, -1});
  const int64_t n = narrow.dim(1);
  DSV3_CHECK(col0 >= 0 && col0 + n <= C, op, ": columns [", col0, ", ", col0 + n, ") of tensor '",
             narrow.name(), "' ", narrow.shape_str(), " do not fit tensor '", wide.name(), "' ",
             wide.shape_str());
}

}  // namespace

void add_inplace(const Tensor& y, const Tensor& x) {
  DSV3_PROFILE(Elementwise);
  const char* op = "add_inplace";
  check_f32_backend(op, y);
  check_f32_backend(op, x);
  expect_same_shape(op, y, x);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&y, &x})) return cuda::add_inplace(y, x);
  float* py = y.f32();
  const float* px = x.f32();
  host::parallel_for("dsv3::add_inplace", y.numel(), [=](int64_t i) { py[i] += px[i]; });
}

void scale(const Tensor& y, const Tensor& x, float alpha) {
  DSV3_PROFILE(Elementwise);
  const char* op = "scale";
  check_f32_backend(op, y);
  check_f32_backend(op, x);
  expect_same_shape(op, y, x);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&y, &x})) return cuda::scale(y, x, alpha);
  float* py = y.f32();
  const float* px = x.f32();
  host::parallel_for("dsv3::scale", y.numel(), [=](int64_t i) { py[i] = alpha * px[i]; });
}

void zero(const Tensor& t) {
  DSV3_PROFILE(Elementwise);
  host::check_backend("zero", t);
  if (t.numel() == 0) return;
  if constexpr (host::kCuda)
    if (host::on_cuda("zero", {&t})) return cuda::zero(t);
  if (t.dtype() == DType::F32) {
    float* p = t.f32();
    host::parallel_for("dsv3::zero", t.numel(), [=](int64_t i) { p[i] = 0.0f; });
  } else {
    std::memset(t.data(), 0, t.bytes());  // all-zero bits are 0 in every dtype
  }
}

// dst[T, n] = src[T, col0 : col0 + n]
void copy_columns(const Tensor& src, int64_t col0, const Tensor& dst) {
  DSV3_PROFILE(Elementwise);
  const char* op = "copy_columns";
  check_f32_backend(op, src);
  check_f32_backend(op, dst);
  check_columns(op, src, dst, col0);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&src, &dst})) return cuda::copy_columns(src, col0, dst);
  const int64_t C = src.dim(1), n = dst.dim(1);
  const float* ps = src.f32();
  float* pd = dst.f32();
  host::parallel_for("dsv3::copy_columns", src.dim(0), [=](int64_t t) {
    const float* s = ps + t * C + col0;
    float* d = pd + t * n;
    for (int64_t j = 0; j < n; ++j) d[j] = s[j];
  });
}

// dsrc[T, col0 : col0 + n] (= or +=) ddst[T, n]
void copy_columns_backward(const Tensor& ddst, int64_t col0, const Tensor& dsrc, bool accumulate) {
  DSV3_PROFILE(Elementwise);
  const char* op = "copy_columns_backward";
  check_f32_backend(op, ddst);
  check_f32_backend(op, dsrc);
  check_columns(op, dsrc, ddst, col0);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&ddst, &dsrc})) return cuda::copy_columns_backward(ddst, col0, dsrc, accumulate);
  const int64_t C = dsrc.dim(1), n = ddst.dim(1);
  const float* pd = ddst.f32();
  float* ps = dsrc.f32();
  host::parallel_for("dsv3::copy_columns_backward", dsrc.dim(0), [=](int64_t t) {
    float* s = ps + t * C + col0;
    const float* d = pd + t * n;
    if (accumulate)
      for (int64_t j = 0; j < n; ++j) s[j] += d[j];
    else
      for (int64_t j = 0; j < n; ++j) s[j] = d[j];
  });
}

}  // namespace dsv3::ops
