// Shared pieces of the CUDA backend (included by .cu files only): error checks that throw
// dsv3::Error naming the op, the streams (one per purpose), the cuBLAS handle, launch helpers.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/error.hpp"
#include "core/tensor.hpp"

namespace dsv3::cuda {

[[noreturn]] void raise_cuda(const char* what, cudaError_t e, const char* file, int line);
[[noreturn]] void raise_cublas(const char* what, cublasStatus_t s, const char* file, int line);

// The streams of a rank: compute (every op), the data-parallel reduction and the expert exchange, so
// that communication can overlap compute with events between them.
enum class Stream : int { Compute = 0, DpReduce = 1, EpExchange = 2 };
cudaStream_t stream(Stream s = Stream::Compute);
cublasHandle_t cublas();  // bound to the compute stream, fp32 math without TF32

// Throws unless t lives on the CUDA device and has dtype `dtype`.
void check_on_device(const char* op, const Tensor& t, DType dtype);
// After a launch: throws with the launch error, naming the op.
void check_launch(const char* op);

// Blocks of `threads` threads to cover n elements (at least one; the grid's x extent is < 2^31).
inline unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  DSV3_CHECK(b < (int64_t(1) << 31), "CUDA launch: ", n, " elements need more than 2^31 blocks");
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

// Sum of v over the block (every thread gets it). blockDim.x must be a multiple of 32, at most 1024.
template <typename T>
__device__ inline T block_sum(T v) {
  __shared__ T part[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // part[] may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? part[lane] : T(0);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Maximum of v over the block (every thread gets it); same constraints as block_sum.
__device__ inline float block_max(float v) {
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? part[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// A device-side flag for preconditions only a kernel can see (an id outside the table): kernels
// record an offending position with flag_position (the smallest one wins), the host reads it after
// the launch and throws naming it.
class ErrorFlag {
 public:
  ErrorFlag();  // "none" on the device
  ~ErrorFlag();
  ErrorFlag(const ErrorFlag&) = delete;
  ErrorFlag& operator=(const ErrorFlag&) = delete;
  unsigned long long* device() const { return d_; }
  int64_t read() const;  // waits for the compute stream; -1 when no kernel recorded a position
 private:
  unsigned long long* d_ = nullptr;
};

__device__ inline void flag_position(unsigned long long* flag, int64_t pos) {
  atomicMin(flag, static_cast<unsigned long long>(pos));
}

}  // namespace dsv3::cuda

#define DSV3_CUDA_CHECK(expr)                                                               \
  do {                                                                                      \
    const cudaError_t dsv3_e = (expr);                                                      \
    if (dsv3_e != cudaSuccess) ::dsv3::cuda::raise_cuda(#expr, dsv3_e, __FILE__, __LINE__); \
  } while (0)
#define DSV3_CUBLAS_CHECK(expr)                                                                         \
  do {                                                                                                  \
    const cublasStatus_t dsv3_s = (expr);                                                               \
    if (dsv3_s != CUBLAS_STATUS_SUCCESS) ::dsv3::cuda::raise_cublas(#expr, dsv3_s, __FILE__, __LINE__); \
  } while (0)
