// CUDA twin of kernels/host/swiglu.cpp: SwiGLU and the routed experts' row scaling (semantics in
// kernels/ops.hpp). Element-wise kernels; the row-scaling gradient reduces each row in double.
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"

namespace dsv3::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void swiglu_fwd_kernel(const float* g, const float* u, float* h, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float z = g[i], s = 1.0f / (1.0f + expf(-z));
    h[i] = z * s * u[i];
  }
}

__global__ void swiglu_bwd_kernel(const float* g, const float* u, const float* dh, float* dg, float* du,
                                  int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float z = g[i], s = 1.0f / (1.0f + expf(-z)), grad = dh[i], uu = u[i];
    dg[i] = grad * uu * s * (1.0f + z * (1.0f - s));
    du[i] = grad * z * s;
  }
}

__global__ void scale_rows_fwd_kernel(const float* x, const float* w, float* y, int64_t R, int64_t F) {
  const int64_t n = R * F;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = w[i / F] * x[i];
}

// One block per row: the dot first (every read of dy happens before any write of dx, which may alias it).
__global__ void scale_rows_bwd_kernel(const float* x, const float* w, const float* dy, float* dx, float* dw,
                                      int64_t F) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * F;
  const float* gr = dy + r * F;
  double dot = 0.0;
  for (int64_t f = threadIdx.x; f < F; f += blockDim.x) dot += double(gr[f]) * xr[f];
  dot = block_sum(dot);
  const float a = w[r];
  __syncthreads();  // block_sum's reads are done
  for (int64_t f = threadIdx.x; f < F; f += blockDim.x) dx[r * F + f] = a * gr[f];
  if (threadIdx.x == 0) dw[r] = float(dot);
}

void check_all(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) check_on_device(op, *t, DType::F32);
}

}  // namespace

void swiglu_forward(const Tensor& g, const Tensor& u, const Tensor& h) {
  check_all("swiglu_forward", {&g, &u, &h});
  const int64_t n = g.numel();
  if (n == 0) return;
  swiglu_fwd_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(g.f32(), u.f32(), h.f32(), n);
  check_launch("swiglu_forward");
}

void swiglu_backward(const Tensor& g, const Tensor& u, const Tensor& dh, const Tensor& dg, const Tensor& du) {
  check_all("swiglu_backward", {&g, &u, &dh, &dg, &du});
  const int64_t n = g.numel();
  if (n == 0) return;
  swiglu_bwd_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(g.f32(), u.f32(), dh.f32(), dg.f32(),
                                                                        du.f32(), n);
  check_launch("swiglu_backward");
}

void scale_rows_forward(const Tensor& x, const Tensor& w, const Tensor& y) {
  check_all("scale_rows_forward", {&x, &w, &y});
  const int64_t R = x.dim(0), F = x.dim(1);
  if (R * F == 0) return;
  scale_rows_fwd_kernel<<<blocks_for(R * F, kThreads), kThreads, 0, stream()>>>(x.f32(), w.f32(), y.f32(), R,
                                                                                F);
  check_launch("scale_rows_forward");
}

void scale_rows_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx,
                         const Tensor& dw) {
  check_all("scale_rows_backward", {&x, &w, &dy, &dx, &dw});
  const int64_t R = x.dim(0), F = x.dim(1);
  if (R == 0) return;
  scale_rows_bwd_kernel<<<unsigned(R), kThreads, 0, stream()>>>(x.f32(), w.f32(), dy.f32(), dx.f32(),
                                                                dw.f32(), F);
  check_launch("scale_rows_backward");
}

}  // namespace dsv3::cuda
