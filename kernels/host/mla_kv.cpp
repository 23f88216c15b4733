// MLA key/value assembly (kernels/ops.hpp): mla_assemble_kv and mla_assemble_kv_backward.
//   kv, dkv [B, S, H, nope + dv]   (kv_b_proj output: per head k_nope then v)
//   k_pe, dk_pe [B, S, R]           (one rotated key head shared by all heads)
//   k, dk [B, S, H, nope + R] = [kv[..., :nope], k_pe];  v, dv [B, S, H, dv] = kv[..., nope:]
#include "core/error.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

using host::check_f32_backend;

struct Dims {
  int64_t B, S, H, nope, R, dv;
};

// kv-like [B, S, H, nope + dv], pe-like [B, S, R], k-like [B, S, H, nope + R], v-like [B, S, H, dv].
Dims check_mla(const char* op, const Tensor& kv, const Tensor& pe, int64_t nope, const Tensor& k,
               const Tensor& v) {
  for (const Tensor* t : {&kv, &pe, &k, &v}) check_f32_backend(op, *t);
  DSV3_CHECK(kv.ndim() == 4, op, ": tensor '", kv.name(), "' has shape ", kv.shape_str(),
             ", expected [B, S, H, nope + dv]");
  DSV3_CHECK(pe.ndim() == 3, op, ": tensor '", pe.name(), "' has shape ", pe.shape_str(),
             ", expected [B, S, R]");
  DSV3_CHECK(nope >= 0 && nope <= kv.dim(3), op, ": nope = ", nope, " does not fit tensor '", kv.name(), "' ",
             kv.shape_str());
  Dims d{kv.dim(0), kv.dim(1), kv.dim(2), nope, pe.dim(2), kv.dim(3) - nope};
  expect_shape(op, pe, {d.B, d.S, d.R});
  expect_shape(op, k, {d.B, d.S, d.H, d.nope + d.R});
  expect_shape(op, v, {d.B, d.S, d.H, d.dv});
  return d;
}

}  // namespace

void mla_assemble_kv(const Tensor& kv, const Tensor& k_pe, int64_t nope, const Tensor& k, const Tensor& v) {
  DSV3_PROFILE(Attention);
  const Dims d = check_mla("mla_assemble_kv", kv, k_pe, nope, k, v);
  if constexpr (host::kCuda)
    if (host::on_cuda("mla_assemble_kv", {&kv, &k_pe, &k, &v}))
      return cuda::mla_assemble_kv(kv, k_pe, nope, k, v);
  const int64_t H = d.H, R = d.R, dvd = d.dv, wkv = nope + dvd, wk = nope + R;
  const float* pkv = kv.f32();
  const float* ppe = k_pe.f32();
  float* pk = k.f32();
  float* pv = v.f32();
  host::parallel_for("dsv3::mla_assemble_kv", d.B * d.S, [=](int64_t t) {
    const float* pe = ppe + t * R;
    for (int64_t h = 0; h < H; ++h) {
      const float* src = pkv + (t * H + h) * wkv;
      float* kr = pk + (t * H + h) * wk;
      float* vr = pv + (t * H + h) * dvd;
      for (int64_t j = 0; j < nope; ++j) kr[j] = src[j];
      for (int64_t j = 0; j < R; ++j) kr[nope + j] = pe[j];
      for (int64_t j = 0; j < dvd; ++j) vr[j] = src[nope + j];
    }
  });
}

// dkv = [dk[..., :nope], dv] (overwritten); dk_pe = sum over heads of dk[..., nope:] (overwritten).
void mla_assemble_kv_backward(const Tensor& dk, const Tensor& dv, int64_t nope, const Tensor& dkv,
                              const Tensor& dk_pe) {
  DSV3_PROFILE(Attention);
  const Dims d = check_mla("mla_assemble_kv_backward", dkv, dk_pe, nope, dk, dv);
  if constexpr (host::kCuda)
    if (host::on_cuda("mla_assemble_kv_backward", {&dk, &dv, &dkv, &dk_pe}))
      return cuda::mla_assemble_kv_backward(dk, dv, nope, dkv, dk_pe);
  const int64_t H = d.H, R = d.R, dvd = d.dv, wkv = nope + dvd, wk = nope + R;
  const float* pdk = dk.f32();
  const float* pdv = dv.f32();
  float* pdkv = dkv.f32();
  float* pdpe = dk_pe.f32();
  host::parallel_for("dsv3::mla_assemble_kv_backward", d.B * d.S, [=](int64_t t) {
    float* pe = pdpe + t * R;
    for (int64_t j = 0; j < R; ++j) pe[j] = 0.0f;
    for (int64_t h = 0; h < H; ++h) {
      const float* kr = pdk + (t * H + h) * wk;
      const float* vr = pdv + (t * H + h) * dvd;
      float* dst = pdkv + (t * H + h) * wkv;
      for (int64_t j = 0; j < nope; ++j) dst[j] = kr[j];
      for (int64_t j = 0; j < dvd; ++j) dst[nope + j] = vr[j];
      for (int64_t j = 0; j < R; ++j) pe[j] += kr[nope + j];
    }
  });
}

}  // namespace dsv3::ops
