// CUDA twin of kernels/host/elementwise.cpp: add_inplace, scale, zero, copy_columns and
// copy_columns_backward (semantics in kernels/ops.hpp; shapes checked by the caller).
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"

namespace dsv3::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void add_kernel(float* y, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] += x[i];
}

__global__ void scale_kernel(float* y, const float* x, float alpha, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = alpha * x[i];
}

// dst[t, j] (= or +=) src[t, col0 + j] (forward), or the reverse direction (backward).
__global__ void columns_kernel(const float* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t rows,
                               int64_t n, bool accumulate) {
  const int64_t total = rows * n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / n, j = i % n;
    const float v = src[t * src_ld + j];
    float* d = dst + t * dst_ld + j;
    *d = accumulate ? *d + v : v;
  }
}

}  // namespace

void add_inplace(const Tensor& y, const Tensor& x) {
  check_on_device("add_inplace", y, DType::F32);
  check_on_device("add_inplace", x, DType::F32);
  if (y.numel() == 0) return;
  add_kernel<<<blocks_for(y.numel(), kThreads), kThreads, 0, stream()>>>(y.f32(), x.f32(), y.numel());
  check_launch("add_inplace");
}

void scale(const Tensor& y, const Tensor& x, float alpha) {
  check_on_device("scale", y, DType::F32);
  check_on_device("scale", x, DType::F32);
  if (y.numel() == 0) return;
  scale_kernel<<<blocks_for(y.numel(), kThreads), kThreads, 0, stream()>>>(y.f32(), x.f32(), alpha,
                                                                           y.numel());
  check_launch("scale");
}

void zero(const Tensor& t) {
  DSV3_CHECK(t.device() == Device::Cuda, "zero: tensor '", t.name(), "' is on the host, expected the GPU");
  if (t.bytes() == 0) return;
  DSV3_CUDA_CHECK(cudaMemsetAsync(t.data(), 0, t.bytes(), stream()));  // zero bits are 0 in every dtype
}

void copy_columns(const Tensor& src, int64_t col0, const Tensor& dst) {
  check_on_device("copy_columns", src, DType::F32);
  check_on_device("copy_columns", dst, DType::F32);
  const int64_t T = src.dim(0), C = src.dim(1), n = dst.dim(1);
  if (T * n == 0) return;
  columns_kernel<<<blocks_for(T * n, kThreads), kThreads, 0, stream()>>>(src.f32() + col0, C, dst.f32(), n, T,
                                                                         n, false);
  check_launch("copy_columns");
}

void copy_columns_backward(const Tensor& ddst, int64_t col0, const Tensor& dsrc, bool accumulate) {
  check_on_device("copy_columns_backward", ddst, DType::F32);
  check_on_device("copy_columns_backward", dsrc, DType::F32);
  const int64_t T = dsrc.dim(0), C = dsrc.dim(1), n = ddst.dim(1);
  if (T * n == 0) return;
  columns_kernel<<<blocks_for(T * n, kThreads), kThreads, 0, stream()>>>(ddst.f32(), n, dsrc.f32() + col0, C,
                                                                         T, n, accumulate);
  check_launch("copy_columns_backward");
}

}  // namespace dsv3::cuda
