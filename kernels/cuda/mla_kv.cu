// CUDA twin of kernels/host/mla_kv.cpp: MLA key/value assembly and its backward (semantics in
// kernels/ops.hpp). The backward sums the rotary key gradient over heads in head order, one thread
// per (token, rotary column), so it is deterministic.
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"

namespace dsv3::cuda {

namespace {

constexpr int kThreads = 256;

// k [T, H, nope + R] = [kv[..., :nope], k_pe], v [T, H, dv] = kv[..., nope:]; one thread per element of
// a head's kv row plus its rotary part.
__global__ void assemble_kernel(const float* kv, const float* pe, float* k, float* v, int64_t T, int64_t H,
                                int64_t nope, int64_t R, int64_t dv) {
  const int64_t wkv = nope + dv, wk = nope + R, w = wkv + R;
  const int64_t n = T * H * w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % w, th = i / w, t = th / H;
    if (j < nope)
      k[th * wk + j] = kv[th * wkv + j];
    else if (j < wkv)
      v[th * dv + (j - nope)] = kv[th * wkv + j];
    else
      k[th * wk + nope + (j - wkv)] = pe[t * R + (j - wkv)];
  }
}

// dkv = [dk[..., :nope], dv]
__global__ void dkv_kernel(const float* dk, const float* dv, float* dkv, int64_t TH, int64_t nope, int64_t R,
                           int64_t dvd) {
  const int64_t wkv = nope + dvd, wk = nope + R;
  const int64_t n = TH * wkv;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % wkv, th = i / wkv;
    dkv[i] = j < nope ? dk[th * wk + j] : dv[th * dvd + (j - nope)];
  }
}

// dk_pe[t, r] = sum over heads (in order) of dk[t, h, nope + r]
__global__ void dpe_kernel(const float* dk, float* dpe, int64_t T, int64_t H, int64_t nope, int64_t R) {
  const int64_t wk = nope + R;
  const int64_t n = T * R;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i % R, t = i / R;
    float acc = 0.0f;
    for (int64_t h = 0; h < H; ++h) acc += dk[(t * H + h) * wk + nope + r];
    dpe[i] = acc;
  }
}

}  // namespace

void mla_assemble_kv(const Tensor& kv, const Tensor& k_pe, int64_t nope, const Tensor& k, const Tensor& v) {
  const char* op = "mla_assemble_kv";
  for (const Tensor* t : {&kv, &k_pe, &k, &v}) check_on_device(op, *t, DType::F32);
  const int64_t T = kv.dim(0) * kv.dim(1), H = kv.dim(2), R = k_pe.dim(2), dv = kv.dim(3) - nope;
  const int64_t n = T * H * (nope + dv + R);
  if (n == 0) return;
  assemble_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(kv.f32(), k_pe.f32(), k.f32(), v.f32(),
                                                                      T, H, nope, R, dv);
  check_launch(op);
}

void mla_assemble_kv_backward(const Tensor& dk, const Tensor& dv, int64_t nope, const Tensor& dkv,
                              const Tensor& dk_pe) {
  const char* op = "mla_assemble_kv_backward";
  for (const Tensor* t : {&dk, &dv, &dkv, &dk_pe}) check_on_device(op, *t, DType::F32);
  const int64_t T = dkv.dim(0) * dkv.dim(1), H = dkv.dim(2), R = dk_pe.dim(2), dvd = dkv.dim(3) - nope;
  if (T * H * (nope + dvd) > 0) {
    dkv_kernel<<<blocks_for(T * H * (nope + dvd), kThreads), kThreads, 0, stream()>>>(
        dk.f32(), dv.f32(), dkv.f32(), T * H, nope, R, dvd);
    check_launch(op);
  }
  if (T * R > 0) {
    dpe_kernel<<<blocks_for(T * R, kThreads), kThreads, 0, stream()>>>(dk.f32(), dk_pe.f32(), T, H, nope, R);
    check_launch(op);
  }
}

}  // namespace dsv3::cuda
