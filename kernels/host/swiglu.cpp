// SwiGLU gating (kernels/ops.hpp): swiglu_forward and swiglu_backward, and the row scaling that
// applies the routed experts' combine weights to their SwiGLU output (scale_rows_*).
//   g, u, h, dh, dg, du [T, F];  h = silu(g) * u,  silu(z) = z * sigmoid(z)
//   dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  du = dh * silu(g)   (both overwritten)
// GPU tensors go to the CUDA twin, kernels/cuda/swiglu.cu.
#include <cmath>

#include "core/error.hpp"
#include "host/fast_math.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

void check_swiglu(const char* op, const Tensor& g, std::initializer_list<const Tensor*> others) {
  host::check_f32_backend(op, g);
  DSV3_CHECK(g.ndim() == 2, op, ": tensor '", g.name(), "' has shape ", g.shape_str(), ", expected [T, F]");
  for (const Tensor* t : others) {
    host::check_f32_backend(op, *t);
    expect_shape(op, *t, {g.dim(0), g.dim(1)});
  }
}

constexpr int64_t kBlock = 256;  // elements per iteration (the exp is vectorised over a block)

// e[j] = exp(-g[j]) for the block of n <= kBlock elements starting at g.
inline void exp_neg(const float* g, int64_t n, float* e) {
  for (int64_t j = 0; j < n; ++j) e[j] = -g[j];
  host::exp_shifted_inplace(e, n, 0.0f);
}

}  // namespace

void swiglu_forward(const Tensor& g, const Tensor& u, const Tensor& h) {
  DSV3_PROFILE(Elementwise);
  check_swiglu("swiglu_forward", g, {&u, &h});
  if constexpr (host::kCuda)
    if (host::on_cuda("swiglu_forward", {&g, &u, &h})) return cuda::swiglu_forward(g, u, h);
  const float* pg = g.f32();
  const float* pu = u.f32();
  float* ph = h.f32();
  const int64_t n = g.numel();
  host::parallel_for("dsv3::swiglu_forward", (n + kBlock - 1) / kBlock, [=](int64_t blk) {
    const int64_t i0 = blk * kBlock, m = n - i0 < kBlock ? n - i0 : kBlock;
    float e[kBlock];
    exp_neg(pg + i0, m, e);
    for (int64_t j = 0; j < m; ++j) {
      const float z = pg[i0 + j], s = 1.0f / (1.0f + e[j]);
      ph[i0 + j] = z * s * pu[i0 + j];
    }
  });
}

void swiglu_backward(const Tensor& g, const Tensor& u, const Tensor& dh, const Tensor& dg, const Tensor& du) {
  DSV3_PROFILE(Elementwise);
  check_swiglu("swiglu_backward", g, {&u, &dh, &dg, &du});
  if constexpr (host::kCuda)
    if (host::on_cuda("swiglu_backward", {&g, &u, &dh, &dg, &du}))
      return cuda::swiglu_backward(g, u, dh, dg, du);
  const float* pg = g.f32();
  const float* pu = u.f32();
  const float* pdh = dh.f32();
  float* pdg = dg.f32();
  float* pdu = du.f32();
  const int64_t n = g.numel();
  host::parallel_for("dsv3::swiglu_backward", (n + kBlock - 1) / kBlock, [=](int64_t blk) {
    const int64_t i0 = blk * kBlock, m = n - i0 < kBlock ? n - i0 : kBlock;
    float e[kBlock];
    exp_neg(pg + i0, m, e);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = i0 + j;
      const float z = pg[i], s = 1.0f / (1.0f + e[j]), grad = pdh[i];
      pdg[i] = grad * pu[i] * s * (1.0f + z * (1.0f - s));
      pdu[i] = grad * z * s;
    }
  });
}

namespace {
void check_scale_rows(const char* op, const Tensor& x, const Tensor& w,
                      std::initializer_list<const Tensor*> rows) {
  check_swiglu(op, x, rows);
  host::check_f32_backend(op, w);
  expect_shape(op, w, {x.dim(0)});
}
}  // namespace

void scale_rows_forward(const Tensor& x, const Tensor& w, const Tensor& y) {
  DSV3_PROFILE(Elementwise);
  check_scale_rows("scale_rows_forward", x, w, {&y});
  if constexpr (host::kCuda)
    if (host::on_cuda("scale_rows_forward", {&x, &w, &y})) return cuda::scale_rows_forward(x, w, y);
  const float* px = x.f32();
  const float* pw = w.f32();
  float* py = y.f32();
  const int64_t F = x.dim(1);
  host::parallel_for("dsv3::scale_rows_forward", x.dim(0), [=](int64_t r) {
    const float a = pw[r];
    for (int64_t f = 0; f < F; ++f) py[r * F + f] = a * px[r * F + f];
  });
}

void scale_rows_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx,
                         const Tensor& dw) {
  DSV3_PROFILE(Elementwise);
  check_scale_rows("scale_rows_backward", x, w, {&dy, &dx});
  expect_dtype("scale_rows_backward", dw, DType::F32);
  expect_shape("scale_rows_backward", dw, {x.dim(0)});
  if constexpr (host::kCuda)
    if (host::on_cuda("scale_rows_backward", {&x, &w, &dy, &dx, &dw}))
      return cuda::scale_rows_backward(x, w, dy, dx, dw);
  const float* px = x.f32();
  const float* pw = w.f32();
  const float* pdy = dy.f32();
  float* pdx = dx.f32();
  float* pdw = dw.f32();
  const int64_t F = x.dim(1);
  host::parallel_for("dsv3::scale_rows_backward", x.dim(0), [=](int64_t r) {
    const float a = pw[r];
    double dot = 0;
    for (int64_t f = 0; f < F; ++f) {
      dot += double(pdy[r * F + f]) * px[r * F + f];
      pdx[r * F + f] = a * pdy[r * F + f];
    }
    pdw[r] = static_cast<float>(dot);
  });
}

}  // namespace dsv3::ops
