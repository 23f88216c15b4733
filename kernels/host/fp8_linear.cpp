// FP8 linear layers on the host (kernels/ops.hpp, "FP8 linear layers"): quantize to E4M3 with tile or
// block scales, then per 128-wide chunk of K an fp32 GEMM of the E4M3 values (exact products, fp32
// sums) whose result, times the two scales, is added to an fp32 accumulator.
#include <cblas.h>

#include <algorithm>
#include <vector>

#include "core/error.hpp"
#include "core/lowp.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

using host::check_2d;

// The transpose of a [rows, cols] f32 matrix.
OwnedTensor transposed(const Tensor& a, const char* name) {
  const int64_t r = a.dim(0), c = a.dim(1);
  OwnedTensor t(DType::F32, {c, r}, name, Device::Host, Fill::Uninitialized);
  const float* src = a.f32();
  float* dst = t.f32();
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) dst[j * r + i] = src[i * c + j];
  return t;
}

}  // namespace

Fp8Operand fp8_quantize(const Tensor& a, bool blocks) {
  const char* op = "fp8_quantize";
  check_2d(op, a);
  const host::F32Input af(op, a);
  const int64_t rows = a.dim(0), k = a.dim(1);
  Fp8Operand q;
  q.blocks = blocks;
  q.codes = OwnedTensor(DType::F8E4M3, {rows, k}, a.name() + ".e4m3", Device::Host, Fill::Uninitialized);
  q.scales = OwnedTensor(DType::F32, {blocks ? lowp::tiles(rows) : rows, lowp::tiles(k)}, a.name() + ".scale",
                         Device::Host, Fill::Uninitialized);
  auto* codes = static_cast<uint8_t*>(q.codes.t.data());
  if (blocks)
    lowp::quantize_blocks(af.data(), rows, k, codes, q.scales.f32());
  else
    lowp::quantize_tiles(af.data(), rows, k, codes, q.scales.f32());
  return q;
}

void fp8_dequantize(const Fp8Operand& q, const Tensor& out) {
  const char* op = "fp8_dequantize";
  host::check_f32_host(op, out);
  expect_shape(op, out, {q.rows(), q.k()});
  const auto* codes = static_cast<const uint8_t*>(q.codes.t.data());
  if (q.blocks)
    lowp::dequantize_blocks(codes, q.scales.f32(), q.rows(), q.k(), out.f32());
  else
    lowp::dequantize_tiles(codes, q.scales.f32(), q.rows(), q.k(), out.f32());
}

void fp8_gemm(const Fp8Operand& a, const Fp8Operand& b, const Tensor& c, bool accumulate) {
  DSV3_PROFILE(Gemm);
  const char* op = "fp8_gemm";
  DSV3_CHECK(!a.blocks, op, ": the left operand '", a.codes.t.name(), "' must have 1 x 128 tile scales");
  const int64_t M = a.rows(), N = b.rows(), K = a.k();
  DSV3_CHECK(b.k() == K, op, ": operands '", a.codes.t.name(), "' ", a.codes.t.shape_str(), " and '",
             b.codes.t.name(), "' ", b.codes.t.shape_str(), " differ in K");
  host::check_f32_host(op, c);
  expect_shape(op, c, {M, N});
  if (M == 0 || N == 0) return;
  // The E4M3 values, unscaled, as f32 (exact).
  const float* tab = lowp::e4m3_table();
  std::vector<float> av(static_cast<size_t>(M * K)), bv(static_cast<size_t>(N * K));
  const auto* ac = static_cast<const uint8_t*>(a.codes.t.data());
  const auto* bc = static_cast<const uint8_t*>(b.codes.t.data());
  for (int64_t i = 0; i < M * K; ++i) av[i] = tab[ac[i]];
  for (int64_t i = 0; i < N * K; ++i) bv[i] = tab[bc[i]];
  const int64_t KT = lowp::tiles(K);
  const float* sa = a.scales.f32();
  const float* sb = b.scales.f32();
  std::vector<float> acc(static_cast<size_t>(M * N), 0.0f), part(static_cast<size_t>(M * N));
  for (int64_t kt = 0; kt < KT; ++kt) {
    const int64_t k0 = kt * lowp::kFp8Tile, kw = std::min(lowp::kFp8Tile, K - k0);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N),
                static_cast<int>(kw), 1.0f, av.data() + k0, static_cast<int>(K), bv.data() + k0,
                static_cast<int>(K), 0.0f, part.data(), static_cast<int>(N));
    for (int64_t m = 0; m < M; ++m) {
      const float s_a = sa[m * KT + kt];
      for (int64_t n = 0; n < N; ++n) {
        const float s_b = b.blocks ? sb[(n / lowp::kFp8Tile) * KT + kt] : sb[n * KT + kt];
        acc[m * N + n] += part[m * N + n] * s_a * s_b;
      }
    }
  }
  float* out = c.f32();
  for (int64_t i = 0; i < M * N; ++i) out[i] = accumulate ? out[i] + acc[i] : acc[i];
}

void fp8_linear_forward(const Tensor& x, const Tensor& w, const Tensor& y, bool accumulate) {
  const char* op = "fp8_linear_forward";
  for (const Tensor* t : {&x, &w, &y}) check_2d(op, *t);
  const int64_t M = x.dim(0), K = x.dim(1), N = w.dim(0);
  expect_shape(op, w, {N, K});
  expect_shape(op, y, {M, N});
  fp8_gemm(fp8_quantize(x, false), fp8_quantize(w, true), y, accumulate);
}

void fp8_linear_backward_input(const Tensor& dy, const Tensor& w, const Tensor& dx, bool accumulate) {
  const char* op = "fp8_linear_backward_input";
  for (const Tensor* t : {&dy, &w, &dx}) check_2d(op, *t);
  const int64_t M = dy.dim(0), N = dy.dim(1), K = w.dim(1);
  expect_shape(op, w, {N, K});
  expect_shape(op, dx, {M, K});
  const host::F32Input wf(op, w);
  // w^T [K, N]: its 128 x 128 blocks are w's blocks transposed (same scales, same codes).
  fp8_gemm(fp8_quantize(dy, false), fp8_quantize(transposed(wf, "w^T"), true), dx, accumulate);
}

void fp8_linear_backward_weight(const Tensor& dy, const Tensor& x, const Tensor& dw) {
  const char* op = "fp8_linear_backward_weight";
  for (const Tensor* t : {&dy, &x, &dw}) check_2d(op, *t);
  const int64_t M = dy.dim(0), N = dy.dim(1), K = x.dim(1);
  expect_shape(op, x, {M, K});
  expect_shape(op, dw, {N, K});
  const host::F32Input dyf(op, dy), xf(op, x);
  // Reduction over the M tokens: dy^T [N, M] and x^T [K, M], both tiled along M.
  fp8_gemm(fp8_quantize(transposed(dyf, "dy^T"), false), fp8_quantize(transposed(xf, "x^T"), false), dw,
           /*accumulate=*/true);
}

}  // namespace dsv3::ops
