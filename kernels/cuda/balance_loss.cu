// CUDA twin of kernels/host/balance_loss.cpp: DeepSeek-V3's complementary sequence-wise balance loss
// and its gradient (semantics in kernels/ops.hpp). Per-token sums and per-(sequence, expert) counts
// and probabilities are computed on the GPU in double; the forward's B*E terms come back to the host
// and are summed there in the host's order (experts, then sequences), so the loss is deterministic.
#include <vector>

#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"

namespace dsv3::cuda {

namespace {

constexpr int kThreads = 128;

__global__ void check_kernel(const int32_t* idx, int64_t n, int64_t E, unsigned long long* flag) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j < n && (idx[j] < 0 || idx[j] >= E)) flag_position(flag, j);
}

// z[t] = sum_i s[t, i]
__global__ void rowsum_kernel(const float* s, double* z, int64_t rows, int64_t E) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= rows) return;
  double acc = 0;
  for (int64_t i = 0; i < E; ++i) acc += s[t * E + i];
  z[t] = acc;
}

// cnt[b*E + i] = tokens of sequence b that chose expert i (a token counts once), times `scale`;
// with P: term[b*E + i] = scale * cnt * (sum_t s[t, i] / z[t]) / S (the forward's terms).
__global__ void expert_kernel(const int32_t* idx, const float* s, const double* z, int64_t B, int64_t S,
                              int64_t E, int64_t K, double scale, bool with_p, double* out) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= B * E) return;
  const int64_t b = j / E, i = j % E;
  double cnt = 0, P = 0;
  for (int64_t t = b * S; t < (b + 1) * S; ++t) {
    const int32_t* ix = idx + t * K;
    for (int64_t k = 0; k < K; ++k) {
      if (ix[k] != i) continue;
      bool repeat = false;
      for (int64_t r = 0; r < k; ++r) repeat = repeat || ix[r] == ix[k];
      if (!repeat) cnt += 1.0;
    }
    if (with_p) P += s[t * E + i] / z[t];
  }
  out[j] = with_p ? scale * cnt * (P / double(S)) : scale * cnt;
}

// ds[t, j] += (c_j - sum_i c_i s[t, i] / z_t) / z_t
__global__ void grad_kernel(const float* s, const double* c, float* ds, int64_t rows, int64_t S, int64_t E) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= rows) return;
  const float* st = s + t * E;
  const double* ct = c + (t / S) * E;
  double z = 0, dot = 0;
  for (int64_t i = 0; i < E; ++i) {
    z += st[i];
    dot += ct[i] * st[i];
  }
  const double mean = dot / z;
  for (int64_t i = 0; i < E; ++i) ds[t * E + i] += static_cast<float>((ct[i] - mean) / z);
}

struct Dims {
  int64_t B, S, E, K;
};

Dims checked(const char* op, const Tensor& scores, const Tensor& idx, int64_t batch) {
  check_on_device(op, scores, DType::F32);
  check_on_device(op, idx, DType::I32);
  const Dims d{batch, scores.dim(0) / batch, scores.dim(1), idx.dim(1)};
  const int64_t n = d.B * d.S * d.K;
  ErrorFlag flag;
  if (n > 0) {
    check_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(idx.i32(), n, d.E, flag.device());
    check_launch(op);
  }
  const int64_t j = flag.read();
  if (j >= 0) {
    int32_t e = 0;
    DSV3_CUDA_CHECK(cudaMemcpy(&e, idx.i32() + j, sizeof(e), cudaMemcpyDeviceToHost));
    raise(op, ": tensor '", idx.name(), "' holds expert ", e, " at token ", j / d.K, ", choice ", j % d.K,
          ", outside [0, ", d.E, ")");
  }
  return d;
}

}  // namespace

double seq_balance_loss_forward(const Tensor& scores, const Tensor& idx, int64_t batch, double alpha) {
  const char* op = "seq_balance_loss_forward";
  const Dims d = checked(op, scores, idx, batch);
  if (d.S == 0) return 0.0;
  const int64_t rows = d.B * d.S;
  OwnedTensor z(DType::F32, {2 * rows}, "token_sums", Device::Cuda, Fill::Uninitialized);  // doubles
  OwnedTensor terms(DType::F32, {2 * d.B * d.E}, "balance_terms", Device::Cuda, Fill::Uninitialized);
  double* pz = static_cast<double*>(z.t.data());
  double* pt = static_cast<double*>(terms.t.data());
  rowsum_kernel<<<blocks_for(rows, kThreads), kThreads, 0, stream()>>>(scores.f32(), pz, rows, d.E);
  check_launch(op);
  const double f_scale = double(d.E) / double(d.K * d.S);
  expert_kernel<<<blocks_for(d.B * d.E, kThreads), kThreads, 0, stream()>>>(idx.i32(), scores.f32(), pz, d.B,
                                                                            d.S, d.E, d.K, f_scale, true, pt);
  check_launch(op);
  std::vector<double> h(static_cast<size_t>(d.B * d.E));
  DSV3_CUDA_CHECK(cudaMemcpyAsync(h.data(), pt, h.size() * sizeof(double), cudaMemcpyDeviceToHost, stream()));
  DSV3_CUDA_CHECK(cudaStreamSynchronize(stream()));
  double total = 0;
  for (int64_t b = 0; b < d.B; ++b) {
    double acc = 0;
    for (int64_t i = 0; i < d.E; ++i) acc += h[b * d.E + i];
    total += alpha * acc;
  }
  return total / double(d.B);
}

void seq_balance_loss_backward(const Tensor& scores, const Tensor& idx, int64_t batch, double alpha,
                               double dloss, const Tensor& dscores) {
  const char* op = "seq_balance_loss_backward";
  const Dims d = checked(op, scores, idx, batch);
  check_on_device(op, dscores, DType::F32);
  if (d.S == 0) return;
  const int64_t rows = d.B * d.S;
  OwnedTensor c(DType::F32, {2 * d.B * d.E}, "balance_grad", Device::Cuda, Fill::Uninitialized);  // doubles
  double* pc = static_cast<double*>(c.t.data());
  const double scale = dloss * alpha / double(d.B) * double(d.E) / double(d.K * d.S) / double(d.S);
  expert_kernel<<<blocks_for(d.B * d.E, kThreads), kThreads, 0, stream()>>>(
      idx.i32(), scores.f32(), nullptr, d.B, d.S, d.E, d.K, scale, false, pc);
  check_launch(op);
  grad_kernel<<<blocks_for(rows, kThreads), kThreads, 0, stream()>>>(scores.f32(), pc, dscores.f32(), rows,
                                                                     d.S, d.E);
  check_launch(op);
}

}  // namespace dsv3::cuda
