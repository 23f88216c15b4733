// SwiGLU gating (kernels/ops.hpp): swiglu_forward and swiglu_backward.
//   g, u, h, dh, dg, du [T, F];  h = silu(g) * u,  silu(z) = z * sigmoid(z)
//   dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  du = dh * silu(g)   (both overwritten)
#include <cmath>

#include "core/error.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"

namespace dsv3::ops {

namespace {

void check_swiglu(const char* op, const Tensor& g, std::initializer_list<const Tensor*> others) {
  expect_dtype(op, g, DType::F32);
  DSV3_CHECK(g.device() == Device::Host, op, ": tensor '", g.name(),
             "' is on a device without a backend in this build (only host)");
  DSV3_CHECK(g.ndim() == 2, op, ": tensor '", g.name(), "' has shape ", g.shape_str(), ", expected [T, F]");
  for (const Tensor* t : others) {
    expect_dtype(op, *t, DType::F32);
    DSV3_CHECK(t->device() == Device::Host, op, ": tensor '", t->name(),
               "' is on a device without a backend in this build (only host)");
    expect_shape(op, *t, {g.dim(0), g.dim(1)});
  }
}

inline float sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

}  // namespace

void swiglu_forward(const Tensor& g, const Tensor& u, const Tensor& h) {
  check_swiglu("swiglu_forward", g, {&u, &h});
  const float* pg = g.f32();
  const float* pu = u.f32();
  float* ph = h.f32();
  host::parallel_for("dsv3::swiglu_forward", g.numel(), [=](int64_t i) {
    const float z = pg[i];
    ph[i] = z * sigmoid(z) * pu[i];
  });
}

void swiglu_backward(const Tensor& g, const Tensor& u, const Tensor& dh, const Tensor& dg, const Tensor& du) {
  check_swiglu("swiglu_backward", g, {&u, &dh, &dg, &du});
  const float* pg = g.f32();
  const float* pu = u.f32();
  const float* pdh = dh.f32();
  float* pdg = dg.f32();
  float* pdu = du.f32();
  host::parallel_for("dsv3::swiglu_backward", g.numel(), [=](int64_t i) {
    const float z = pg[i], s = sigmoid(z), grad = pdh[i];
    pdg[i] = grad * pu[i] * s * (1.0f + z * (1.0f - s));
    pdu[i] = grad * z * s;
  });
}

}  // namespace dsv3::ops
