// CUDA twin of kernels/host/rmsnorm.cpp (semantics in kernels/ops.hpp). One block per row for the
// forward and the input gradient, row sums in double as on the host; the weight gradient walks the
// rows in order per column.
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"

namespace dsv3::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void rmsnorm_fwd_kernel(const float* x, const float* w, float eps, float* y, float* rstd,
                                   int64_t D) {
  const int64_t t = blockIdx.x;
  const float* xr = x + t * D;
  double ss = 0.0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) ss += double(xr[j]) * xr[j];
  ss = block_sum(ss);
  const double mean = D > 0 ? ss / double(D) : 0.0;
  const float r = float(1.0 / sqrt(mean + double(eps)));
  if (threadIdx.x == 0) rstd[t] = r;
  float* yr = y + t * D;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) yr[j] = xr[j] * r * w[j];
}

__global__ void rmsnorm_bwd_dx_kernel(const float* x, const float* w, const float* rstd, const float* dy,
                                      float* dx, int64_t D, bool accumulate) {
  const int64_t t = blockIdx.x;
  const float* xr = x + t * D;
  const float* gr = dy + t * D;
  double c = 0.0;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) c += double(gr[j]) * w[j] * xr[j];
  c = block_sum(c);
  const float r = rstd[t];
  const float k = float(double(r) * r * r * c / double(D));
  float* dxr = dx + t * D;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
    const float v = r * w[j] * gr[j] - k * xr[j];
    dxr[j] = accumulate ? dxr[j] + v : v;
  }
}

__global__ void rmsnorm_bwd_dw_kernel(const float* x, const float* rstd, const float* dy, float* dw,
                                      int64_t T, int64_t D) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= D) return;
  double acc = 0.0;
  for (int64_t t = 0; t < T; ++t) acc += double(dy[t * D + j] * x[t * D + j] * rstd[t]);
  dw[j] += float(acc);
}

void check_all(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) check_on_device(op, *t, DType::F32);
}

}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, const Tensor& y, const Tensor& rstd) {
  check_all("rmsnorm_forward", {&x, &w, &y, &rstd});
  const int64_t T = x.dim(0), D = x.dim(1);
  if (T == 0) return;
  rmsnorm_fwd_kernel<<<unsigned(T), kThreads, 0, stream()>>>(x.f32(), w.f32(), eps, y.f32(), rstd.f32(), D);
  check_launch("rmsnorm_forward");
}

void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy,
                      const Tensor& dx, const Tensor& dw, bool accumulate_dx) {
  check_all("rmsnorm_backward", {&x, &w, &rstd, &dy, &dx, &dw});
  const int64_t T = x.dim(0), D = x.dim(1);
  if (T == 0 || D == 0) return;
  rmsnorm_bwd_dx_kernel<<<unsigned(T), kThreads, 0, stream()>>>(x.f32(), w.f32(), rstd.f32(), dy.f32(),
                                                                dx.f32(), D, accumulate_dx);
  check_launch("rmsnorm_backward");
  rmsnorm_bwd_dw_kernel<<<blocks_for(D, kThreads), kThreads, 0, stream()>>>(x.f32(), rstd.f32(), dy.f32(),
                                                                            dw.f32(), T, D);
  check_launch("rmsnorm_backward (weight)");
}

}  // namespace dsv3::cuda
