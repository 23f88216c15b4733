// CUDA twin of kernels/host/linear.cpp: the three GEMMs of a linear layer through cuBLAS in fp32
// (pedantic math: no TF32, so results match the host within fp32 summation-order differences).
// Row-major x [M, K], w [N, K], y [M, N] are column-major x^T [K, M], w^T [K, N], y^T [N, M], so
//   y = x . w^T      is  y^T  = w . x^T        : gemm(T, N) with A = w, B = x
//   dx = dy . w      is  dx^T = w^T . dy^T     : gemm(N, N) with A = w, B = dy
//   dw += dy^T . x   is  dw^T += x^T . dy      : gemm(N, T) with A = x, B = dy
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"

namespace dsv3::cuda {

namespace {

int blas_int(const char* op, int64_t v) {
  DSV3_CHECK(v <= 0x7fffffff, op, ": extent ", v, " is too large for cuBLAS");
  return static_cast<int>(v < 1 ? 1 : v);
}

void check3(const char* op, const Tensor& a, const Tensor& b, const Tensor& c) {
  for (const Tensor* t : {&a, &b, &c}) {
    DSV3_CHECK(t->dtype() == DType::F32, op, ": tensor '", t->name(), "' is ", dtype_name(t->dtype()),
               "; the CUDA backend has fp32 GEMMs only so far");
    check_on_device(op, *t, DType::F32);
  }
}

// C[m, n] (column-major, ldc) = alpha op(A) op(B) + beta C
void sgemm(const char* op, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k,
           const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const float alpha = 1.0f;
  if (k == 0) {
    if (beta == 0.0f) DSV3_CUDA_CHECK(cudaMemsetAsync(c, 0, size_t(m) * size_t(n) * sizeof(float), stream()));
    return;  // beta == 1: nothing to add
  }
  DSV3_CUBLAS_CHECK(cublasSgemm(cublas(), ta, tb, blas_int(op, m), blas_int(op, n), blas_int(op, k), &alpha,
                                a, blas_int(op, lda), b, blas_int(op, ldb), &beta, c, blas_int(op, ldc)));
}

}  // namespace

void linear_forward(const Tensor& x, const Tensor& w, const Tensor& y, bool accumulate) {
  const char* op = "linear_forward";
  check3(op, x, w, y);
  const int64_t M = x.dim(0), K = x.dim(1), N = w.dim(0);
  sgemm(op, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, w.f32(), K, x.f32(), K, accumulate ? 1.0f : 0.0f, y.f32(), N);
}

void linear_backward_input(const Tensor& dy, const Tensor& w, const Tensor& dx, bool accumulate) {
  const char* op = "linear_backward_input";
  check3(op, dy, w, dx);
  const int64_t M = dy.dim(0), N = dy.dim(1), K = w.dim(1);
  sgemm(op, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, w.f32(), K, dy.f32(), N, accumulate ? 1.0f : 0.0f, dx.f32(),
        K);
}

void linear_backward_weight(const Tensor& dy, const Tensor& x, const Tensor& dw) {
  const char* op = "linear_backward_weight";
  check3(op, dy, x, dw);
  const int64_t M = dy.dim(0), N = dy.dim(1), K = x.dim(1);
  sgemm(op, CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, x.f32(), K, dy.f32(), N, 1.0f, dw.f32(), K);
}

}  // namespace dsv3::cuda
