// CUDA twin of the rotations of kernels/host/rope.cpp (rope_forward / rope_backward; semantics in
// kernels/ops.hpp). The cos/sin tables are built on the host (rope_table, angles in double) and
// copied to the device. One thread per rotated pair.
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"

namespace dsv3::cuda {

namespace {

constexpr int kThreads = 256;

// x [B*S, H, Dh]: the pair (offset + 2i, offset + 2i + 1) of every head rotated by sign * angle(s, i).
__global__ void rope_kernel(float* x, const float* cos, const float* sin, int64_t BS, int64_t S, int64_t H,
                            int64_t Dh, int64_t half, int64_t offset, float sign) {
  const int64_t n = BS * H * half;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = i % half, bsh = i / half, bs = bsh / H, s = bs % S;
    float* row = x + bsh * Dh + offset;
    const float a = row[2 * p], b = row[2 * p + 1], c = cos[s * half + p], sn = sign * sin[s * half + p];
    row[2 * p] = a * c - b * sn;
    row[2 * p + 1] = a * sn + b * c;
  }
}

}  // namespace

void rope_apply(const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t offset, bool inverse) {
  const char* op = inverse ? "rope_backward" : "rope_forward";
  for (const Tensor* t : {&x, &cos, &sin}) check_on_device(op, *t, DType::F32);
  const int64_t B = x.dim(0), S = x.dim(1), H = x.dim(2), Dh = x.dim(3), half = cos.dim(1);
  const int64_t n = B * S * H * half;
  if (n == 0) return;
  rope_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(x.f32(), cos.f32(), sin.f32(), B * S, S, H,
                                                                  Dh, half, offset, inverse ? -1.0f : 1.0f);
  check_launch(op);
}

}  // namespace dsv3::cuda
