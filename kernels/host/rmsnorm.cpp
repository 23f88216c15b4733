// RMSNorm over the last dimension (kernels/ops.hpp): rmsnorm_forward and rmsnorm_backward.
//   x, y, dy, dx [T, D]; w, dw [D]; rstd [T]
//   forward:  rstd[t] = 1 / sqrt(mean_j x[t,j]^2 + eps); y = x * rstd * w
//   backward: dx[t,j] (= or +=) rstd w_j dy_j - rstd^3 x_j / D * sum_k dy_k w_k x_k
//             dw[j] += sum_t dy[t,j] x[t,j] rstd[t]
// Row sums are accumulated in double. GPU tensors go to the CUDA twin, kernels/cuda/rmsnorm.cu.
#include <cmath>

#include "core/error.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

using host::check_backend;
using host::check_f32_backend;

// Checks x [T, D], w [D], rstd [T] and every extra tensor [T, D].
void check_rmsnorm(const char* op, const Tensor& x, const Tensor& w, const Tensor& rstd,
                   std::initializer_list<const Tensor*> rows) {
  check_f32_backend(op, x);
  check_backend(op, w);  // f32 or bf16 (a compute weight)
  check_f32_backend(op, rstd);
  DSV3_CHECK(x.ndim() == 2, op, ": tensor '", x.name(), "' has shape ", x.shape_str(), ", expected [T, D]");
  const int64_t T = x.dim(0), D = x.dim(1);
  expect_shape(op, w, {D});
  expect_shape(op, rstd, {T});
  for (const Tensor* t : rows) {
    check_f32_backend(op, *t);
    expect_shape(op, *t, {T, D});
  }
}

}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, const Tensor& y, const Tensor& rstd) {
  DSV3_PROFILE(Elementwise);
  const char* op = "rmsnorm_forward";
  check_rmsnorm(op, x, w, rstd, {&y});
  DSV3_CHECK(eps >= 0.0f, op, ": eps must be >= 0, got ", eps);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&x, &w, &y, &rstd})) return cuda::rmsnorm_forward(x, w, eps, y, rstd);
  const int64_t D = x.dim(1);
  const host::F32Input wf(op, w);
  const float* px = x.f32();
  const float* pw = wf.data();
  float* py = y.f32();
  float* pr = rstd.f32();
  host::parallel_for("dsv3::rmsnorm_forward", x.dim(0), [=](int64_t t) {
    const float* xr = px + t * D;
    float* yr = py + t * D;
    double ss = 0.0;
    for (int64_t j = 0; j < D; ++j) ss += static_cast<double>(xr[j]) * xr[j];
    const double mean = D > 0 ? ss / static_cast<double>(D) : 0.0;
    const float r = static_cast<float>(1.0 / std::sqrt(mean + static_cast<double>(eps)));
    pr[t] = r;
    for (int64_t j = 0; j < D; ++j) yr[j] = xr[j] * r * pw[j];
  });
}

void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy,
                      const Tensor& dx, const Tensor& dw, bool accumulate_dx) {
  DSV3_PROFILE(Elementwise);
  const char* op = "rmsnorm_backward";
  check_rmsnorm(op, x, w, rstd, {&dy, &dx});
  check_f32_backend(op, dw);
  const int64_t T = x.dim(0), D = x.dim(1);
  expect_shape(op, dw, {D});
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&x, &w, &rstd, &dy, &dx, &dw}))
      return cuda::rmsnorm_backward(x, w, rstd, dy, dx, dw, accumulate_dx);
  const host::F32Input wf(op, w);
  const float* px = x.f32();
  const float* pw = wf.data();
  const float* pr = rstd.f32();
  const float* pdy = dy.f32();
  float* pdx = dx.f32();
  float* pdw = dw.f32();
  // dx, one row per iteration.
  host::parallel_for("dsv3::rmsnorm_backward", T, [=](int64_t t) {
    const float* xr = px + t * D;
    const float* gr = pdy + t * D;
    float* dxr = pdx + t * D;
    double c = 0.0;
    for (int64_t j = 0; j < D; ++j) c += static_cast<double>(gr[j]) * pw[j] * xr[j];
    const float r = pr[t];
    const float k = static_cast<float>(static_cast<double>(r) * r * r * c / static_cast<double>(D));
    for (int64_t j = 0; j < D; ++j) {
      const float v = r * pw[j] * gr[j] - k * xr[j];
      dxr[j] = accumulate_dx ? dxr[j] + v : v;
    }
  });
  // dw, one block of 64 columns per iteration (rows in order, no races).
  constexpr int64_t kBlock = 64;
  host::parallel_for("dsv3::rmsnorm_backward_weight", (D + kBlock - 1) / kBlock, [=](int64_t blk) {
    const int64_t j0 = blk * kBlock, j1 = j0 + kBlock < D ? j0 + kBlock : D;
    double acc[kBlock] = {};
    for (int64_t t = 0; t < T; ++t) {
      const float r = pr[t];
      const float* xr = px + t * D;
      const float* gr = pdy + t * D;
      for (int64_t j = j0; j < j1; ++j) acc[j - j0] += static_cast<double>(gr[j] * xr[j] * r);
    }
    for (int64_t j = j0; j < j1; ++j) pdw[j] += static_cast<float>(acc[j - j0]);
  });
}

}  // namespace dsv3::ops
