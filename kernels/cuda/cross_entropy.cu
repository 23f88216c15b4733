// CUDA twin of kernels/host/cross_entropy.cpp: the full-vocabulary cross-entropy and its
// vocabulary-parallel shard form (semantics in kernels/ops.hpp). One block per row: the row maximum, the
// shifted exponential sum in double, the log-sum-exp; the backward overwrites the logits with the gradient,
// renormalised by the sum of the exponentials as on the host. A target >= V is recorded and the op throws
// naming the row.
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"

namespace dsv3::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void ce_fwd_kernel(const float* logits, const int32_t* targets, float* losses, float* lse,
                              int64_t V, unsigned long long* flag) {
  const int64_t c = blockIdx.x;
  const float* l = logits + c * V;
  float m = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, l[v]);
  m = block_max(m);
  double sum = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) sum += double(expf(l[v] - m));
  sum = block_sum(sum);
  if (threadIdx.x != 0) return;
  const double z = double(m) + log(sum);
  lse[c] = float(z);
  const int32_t tg = targets[c];
  if (tg >= V) {
    flag_position(flag, c);
    losses[c] = 0.0f;
    return;
  }
  losses[c] = tg < 0 ? 0.0f : float(z - double(l[tg]));
}

__global__ void ce_bwd_kernel(float* logits, const int32_t* targets, const float* lse, const float* dloss,
                              int64_t V, unsigned long long* flag) {
  const int64_t c = blockIdx.x;
  float* l = logits + c * V;
  const int32_t tg = targets[c];
  if (tg < 0 || tg >= V) {
    if (tg >= V && threadIdx.x == 0) flag_position(flag, c);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) l[v] = 0.0f;
    return;
  }
  const float z = lse[c], g = dloss[c];
  double sum = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float e = expf(l[v] - z);
    l[v] = e;
    sum += double(e);
  }
  sum = block_sum(sum);
  const float f = float(double(g) / sum);
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) l[v] *= f;
  __syncthreads();
  if (threadIdx.x == 0) l[tg] -= g;
}

// The shard forms: columns [first, first + Vs) of the full logits; targets are full-vocabulary ids.
__global__ void ce_shard_fwd_kernel(const float* logits, const int32_t* targets, int64_t first, int64_t vocab,
                                    float* shard_lse, float* target_logit, int64_t Vs,
                                    unsigned long long* flag) {
  const int64_t c = blockIdx.x;
  const float* l = logits + c * Vs;
  float m = -INFINITY;
  for (int64_t v = threadIdx.x; v < Vs; v += blockDim.x) m = fmaxf(m, l[v]);
  m = block_max(m);
  double sum = 0.0;
  for (int64_t v = threadIdx.x; v < Vs; v += blockDim.x) sum += double(expf(l[v] - m));
  sum = block_sum(sum);
  if (threadIdx.x != 0) return;
  shard_lse[c] = float(double(m) + log(sum));
  const int32_t tg = targets[c];
  if (tg >= vocab) flag_position(flag, c);
  const int64_t j = int64_t(tg) - first;
  target_logit[c] = tg >= 0 && tg < vocab && j >= 0 && j < Vs ? l[j] : 0.0f;
}

__global__ void ce_shard_bwd_kernel(float* logits, const int32_t* targets, int64_t first, int64_t vocab,
                                    const float* lse, const float* dloss, int64_t Vs,
                                    unsigned long long* flag) {
  const int64_t c = blockIdx.x;
  float* l = logits + c * Vs;
  const int32_t tg = targets[c];
  if (tg < 0 || tg >= vocab) {
    if (tg >= vocab && threadIdx.x == 0) flag_position(flag, c);
    for (int64_t v = threadIdx.x; v < Vs; v += blockDim.x) l[v] = 0.0f;
    return;
  }
  const float z = lse[c], g = dloss[c];
  const int64_t j = int64_t(tg) - first;
  for (int64_t v = threadIdx.x; v < Vs; v += blockDim.x) {
    const float p = expf(l[v] - z);
    l[v] = v == j ? g * (p - 1.0f) : p * g;
  }
}

void bad_target(const char* op, const Tensor& logits, const Tensor& targets, int64_t row) {
  int32_t tg = 0;
  DSV3_CUDA_CHECK(cudaMemcpy(&tg, targets.i32() + row, sizeof(tg), cudaMemcpyDeviceToHost));
  raise(op, ": row ", row, " has target ", tg, ", outside the vocabulary [0, ", logits.dim(1),
        ") of tensor '", logits.name(), "'");
}

[[noreturn]] void bad_shard_target(const char* op, const Tensor& logits, const Tensor& targets, int64_t row,
                                   int64_t vocab) {
  int32_t tg = 0;
  DSV3_CUDA_CHECK(cudaMemcpy(&tg, targets.i32() + row, sizeof(tg), cudaMemcpyDeviceToHost));
  raise(op, ": row ", row, " has target ", tg, ", outside the vocabulary [0, ", vocab, ") (shard tensor '",
        logits.name(), "')");
}

}  // namespace

void cross_entropy_forward(const Tensor& logits, const Tensor& targets, const Tensor& losses,
                           const Tensor& lse) {
  const char* op = "cross_entropy_forward";
  check_on_device(op, logits, DType::F32);
  check_on_device(op, targets, DType::I32);
  check_on_device(op, losses, DType::F32);
  check_on_device(op, lse, DType::F32);
  const int64_t C = logits.dim(0), V = logits.dim(1);
  if (C == 0) return;
  ErrorFlag flag;
  ce_fwd_kernel<<<unsigned(C), kThreads, 0, stream()>>>(logits.f32(), targets.i32(), losses.f32(), lse.f32(),
                                                        V, flag.device());
  check_launch(op);
  const int64_t row = flag.read();
  if (row >= 0) bad_target(op, logits, targets, row);
}

void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                            const Tensor& dloss) {
  const char* op = "cross_entropy_backward";
  check_on_device(op, logits, DType::F32);
  check_on_device(op, targets, DType::I32);
  check_on_device(op, lse, DType::F32);
  check_on_device(op, dloss, DType::F32);
  const int64_t C = logits.dim(0), V = logits.dim(1);
  if (C == 0) return;
  ErrorFlag flag;
  ce_bwd_kernel<<<unsigned(C), kThreads, 0, stream()>>>(logits.f32(), targets.i32(), lse.f32(), dloss.f32(),
                                                        V, flag.device());
  check_launch(op);
  const int64_t row = flag.read();
  if (row >= 0) bad_target(op, logits, targets, row);
}

void cross_entropy_shard_forward(const Tensor& logits, const Tensor& targets, int64_t first, int64_t vocab,
                                 const Tensor& shard_lse, const Tensor& target_logit) {
  const char* op = "cross_entropy_shard_forward";
  check_on_device(op, logits, DType::F32);
  check_on_device(op, targets, DType::I32);
  check_on_device(op, shard_lse, DType::F32);
  check_on_device(op, target_logit, DType::F32);
  const int64_t C = logits.dim(0), Vs = logits.dim(1);
  if (C == 0) return;
  ErrorFlag flag;
  ce_shard_fwd_kernel<<<unsigned(C), kThreads, 0, stream()>>>(
      logits.f32(), targets.i32(), first, vocab, shard_lse.f32(), target_logit.f32(), Vs, flag.device());
  check_launch(op);
  const int64_t row = flag.read();
  if (row >= 0) bad_shard_target(op, logits, targets, row, vocab);
}

void cross_entropy_shard_backward(const Tensor& logits, const Tensor& targets, int64_t first, int64_t vocab,
                                  const Tensor& lse, const Tensor& dloss) {
  const char* op = "cross_entropy_shard_backward";
  check_on_device(op, logits, DType::F32);
  check_on_device(op, targets, DType::I32);
  check_on_device(op, lse, DType::F32);
  check_on_device(op, dloss, DType::F32);
  const int64_t C = logits.dim(0), Vs = logits.dim(1);
  if (C == 0) return;
  ErrorFlag flag;
  ce_shard_bwd_kernel<<<unsigned(C), kThreads, 0, stream()>>>(logits.f32(), targets.i32(), first, vocab,
                                                              lse.f32(), dloss.f32(), Vs, flag.device());
  check_launch(op);
  const int64_t row = flag.read();
  if (row >= 0) bad_shard_target(op, logits, targets, row, vocab);
}

}  // namespace dsv3::cuda
