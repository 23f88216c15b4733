// Dense algebra through CBLAS (row-major sgemm): linear_forward, linear_backward_input and
// linear_backward_weight of kernels/ops.hpp. Inputs may be bf16 (read exactly as f32: a bf16 GEMM with
// fp32 accumulation, since products of bf16 values are exact in f32); outputs are f32. GPU tensors go
// to the CUDA twin, kernels/cuda/linear.cu (cuBLAS, fp32 only so far).
//   x [M, K], w [N, K] (HF layout [out, in]), y [M, N]
//   forward:         y  (= or +=) x . w^T
//   backward input:  dx (= or +=) dy . w
//   backward weight: dw += dy^T . x
#include <cblas.h>

#include <algorithm>

#include "core/error.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

using host::check_2d;
using host::check_f32_backend;
using host::F32Input;

int blas_int(const char* op, int64_t v) {
  DSV3_CHECK(v <= 0x7fffffff, op, ": extent ", v, " is too large for CBLAS");
  return static_cast<int>(v);
}

// C[m, n] = alpha * op(A) . op(B) + beta * C, row-major, leading dimensions >= 1.
void sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    // Nothing to multiply: C = beta * C.
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              blas_int("sgemm", m), blas_int("sgemm", n), blas_int("sgemm", k), alpha, a,
              blas_int("sgemm", std::max<int64_t>(lda, 1)), b, blas_int("sgemm", std::max<int64_t>(ldb, 1)),
              beta, c, blas_int("sgemm", std::max<int64_t>(ldc, 1)));
}

}  // namespace

// y[M, N] (= or +=) x[M, K] . w[N, K]^T
void linear_forward(const Tensor& x, const Tensor& w, const Tensor& y, bool accumulate) {
  DSV3_PROFILE(Gemm);
  const char* op = "linear_forward";
  for (const Tensor* t : {&x, &w, &y}) check_2d(op, *t);
  check_f32_backend(op, y);
  const int64_t M = x.dim(0), K = x.dim(1), N = w.dim(0);
  expect_shape(op, w, {N, K});
  expect_shape(op, y, {M, N});
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&x, &w, &y})) return cuda::linear_forward(x, w, y, accumulate);
  const F32Input xf(op, x), wf(op, w);
  sgemm(false, true, M, N, K, 1.0f, xf.data(), K, wf.data(), K, accumulate ? 1.0f : 0.0f, y.f32(), N);
}

// dx[M, K] (= or +=) dy[M, N] . w[N, K]
void linear_backward_input(const Tensor& dy, const Tensor& w, const Tensor& dx, bool accumulate) {
  DSV3_PROFILE(Gemm);
  const char* op = "linear_backward_input";
  for (const Tensor* t : {&dy, &w, &dx}) check_2d(op, *t);
  check_f32_backend(op, dx);
  const int64_t M = dy.dim(0), N = dy.dim(1), K = w.dim(1);
  expect_shape(op, w, {N, K});
  expect_shape(op, dx, {M, K});
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&dy, &w, &dx})) return cuda::linear_backward_input(dy, w, dx, accumulate);
  const F32Input dyf(op, dy), wf(op, w);
  sgemm(false, false, M, K, N, 1.0f, dyf.data(), N, wf.data(), K, accumulate ? 1.0f : 0.0f, dx.f32(), K);
}

// dw[N, K] += dy[M, N]^T . x[M, K]
void linear_backward_weight(const Tensor& dy, const Tensor& x, const Tensor& dw) {
  DSV3_PROFILE(Gemm);
  const char* op = "linear_backward_weight";
  for (const Tensor* t : {&dy, &x, &dw}) check_2d(op, *t);
  check_f32_backend(op, dw);
  const int64_t M = dy.dim(0), N = dy.dim(1), K = x.dim(1);
  expect_shape(op, x, {M, K});
  expect_shape(op, dw, {N, K});
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&dy, &x, &dw})) return cuda::linear_backward_weight(dy, x, dw);
  const F32Input dyf(op, dy), xf(op, x);
  sgemm(true, false, N, K, M, 1.0f, dyf.data(), N, xf.data(), K, 1.0f, dw.f32(), K);
}

}  // namespace dsv3::ops
