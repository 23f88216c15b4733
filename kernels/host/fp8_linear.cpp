// FP8 linear layers on the host (kernels/ops.hpp, "FP8 linear layers"): quantize to E4M3 with tile or
// block scales, then per 128-wide chunk of K an fp32 GEMM of the E4M3 values (exact products, fp32
// sums) whose result, times the two scales, is added to an fp32 accumulator.
#include <cblas.h>
#include <sys/mman.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/lowp.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

using host::check_2d;

Fp8Operand make_operand(int64_t rows, int64_t k, bool blocks, const std::string& name) {
  Fp8Operand q;
  q.blocks = blocks;
  q.codes = OwnedTensor(DType::F8E4M3, {rows, k}, name + ".e4m3", Device::Host, Fill::Uninitialized);
  q.scales = OwnedTensor(DType::F32, {blocks ? lowp::tiles(rows) : rows, lowp::tiles(k)}, name + ".scale",
                         Device::Host, Fill::Uninitialized);
  return q;
}

// fp8_quantize of a's transpose [cols, rows], bit for bit, without an f32 transpose: tiles along a's
// rows are quantized in place; 128 x 128 blocks are the same blocks as a's (same amax, same codes),
// so a's codes and block scales are transposed.
Fp8Operand fp8_quantize_transposed(const Tensor& a, bool blocks, const char* op) {
  const host::F32Input af(op, a);
  const int64_t rows = a.dim(0), cols = a.dim(1);
  Fp8Operand q = make_operand(cols, rows, blocks, a.name() + "^T");
  auto* codes = static_cast<uint8_t*>(q.codes.t.data());
  if (!blocks) {
    lowp::quantize_tiles_transposed(af.data(), rows, cols, codes, q.scales.f32());
    return q;
  }
  const Fp8Operand d = fp8_quantize(af, true);
  const auto* dc = static_cast<const uint8_t*>(d.codes.t.data());
  for (int64_t cb = 0; cb < cols; cb += 32)
    for (int64_t rb = 0; rb < rows; rb += 32)
      for (int64_t c = cb; c < std::min(cols, cb + 32); ++c)
        for (int64_t r = rb; r < std::min(rows, rb + 32); ++r) codes[c * rows + r] = dc[r * cols + c];
  const int64_t br = lowp::tiles(rows), bc = lowp::tiles(cols);
  const float* ds = d.scales.f32();
  float* qs = q.scales.f32();
  for (int64_t i = 0; i < br; ++i)
    for (int64_t j = 0; j < bc; ++j) qs[j * br + i] = ds[i * bc + j];
  return q;
}

// fp8_gemm's scratch: one buffer kept between calls so that a step's many GEMMs do not fault in
// fresh pages; it grows to the largest single GEMM (the size the memory accounting counts for it).
// Mapped on its own, so that growing it leaves no freed block behind in the heap.
class Scratch {
 public:
  ~Scratch() { release(); }
  float* get(int64_t n) {
    const size_t bytes = static_cast<size_t>(n) * sizeof(float);
    if (bytes > size_) {
      release();
      void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      DSV3_CHECK(p != MAP_FAILED, "fp8_gemm: cannot map ", bytes, " bytes of scratch");
      data_ = static_cast<float*>(p), size_ = bytes;
    }
    return data_;
  }

 private:
  void release() {
    if (data_) munmap(data_, size_);
    data_ = nullptr, size_ = 0;
  }
  float* data_ = nullptr;
  size_t size_ = 0;
};
float* scratch(int64_t n) {
  thread_local Scratch s;
  return s.get(n);
}

}  // namespace

Fp8Operand fp8_quantize(const Tensor& a, bool blocks) {
  const char* op = "fp8_quantize";
  check_2d(op, a);
  const host::F32Input af(op, a);
  const int64_t rows = a.dim(0), k = a.dim(1);
  Fp8Operand q = make_operand(rows, k, blocks, a.name());
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
  // The decoded operands, the accumulator and a chunk's partials, in the scratch buffer.
  float* av = scratch(M * K + N * K + 2 * M * N);
  float* bv = av + M * K;
  float* acc = bv + N * K;
  float* part = acc + M * N;
  const auto* ac = static_cast<const uint8_t*>(a.codes.t.data());
  const auto* bc = static_cast<const uint8_t*>(b.codes.t.data());
  for (int64_t i = 0; i < M * K; ++i) av[i] = tab[ac[i]];
  for (int64_t i = 0; i < N * K; ++i) bv[i] = tab[bc[i]];
  std::fill(acc, acc + M * N, 0.0f);
  const int64_t KT = lowp::tiles(K);
  const float* sa = a.scales.f32();
  const float* sb = b.scales.f32();
  for (int64_t kt = 0; kt < KT; ++kt) {
    const int64_t k0 = kt * lowp::kFp8Tile, kw = std::min(lowp::kFp8Tile, K - k0);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N),
                static_cast<int>(kw), 1.0f, av + k0, static_cast<int>(K), bv + k0, static_cast<int>(K), 0.0f,
                part, static_cast<int>(N));
    for (int64_t m = 0; m < M; ++m) {
      const float s_a = sa[m * KT + kt];
      float* am = acc + m * N;
      const float* pm = part + m * N;
      if (b.blocks) {  // one scale per 128 columns
        for (int64_t n0 = 0; n0 < N; n0 += lowp::kFp8Tile) {
          const float s_b = sb[(n0 / lowp::kFp8Tile) * KT + kt];
          const int64_t n1 = std::min(N, n0 + lowp::kFp8Tile);
          for (int64_t n = n0; n < n1; ++n) am[n] += pm[n] * s_a * s_b;
        }
      } else {
        for (int64_t n = 0; n < N; ++n) am[n] += pm[n] * s_a * sb[n * KT + kt];
      }
    }
  }
  float* out = c.f32();
  if (accumulate)
    for (int64_t i = 0; i < M * N; ++i) out[i] += acc[i];
  else
    std::copy(acc, acc + M * N, out);
}

void fp8_linear_forward(const Tensor& x, const Tensor& w, const Tensor& y, bool accumulate) {
  const char* op = "fp8_linear_forward";
  for (const Tensor* t : {&x, &w, &y}) check_2d(op, *t);
  const int64_t M = x.dim(0), K = x.dim(1), N = w.dim(0);
  expect_shape(op, w, {N, K});
  expect_shape(op, y, {M, N});
  fp8_gemm(fp8_quantize(x, false), fp8_quantize(w, true), y, accumulate);
}

void fp8_linear_forward(const Fp8Operand& xq, const Tensor& w, const Tensor& y, bool accumulate) {
  const char* op = "fp8_linear_forward";
  DSV3_CHECK(!xq.blocks, op, ": the activation '", xq.codes.t.name(), "' must have 1 x 128 tile scales");
  for (const Tensor* t : {&w, &y}) check_2d(op, *t);
  const int64_t M = xq.rows(), K = xq.k(), N = w.dim(0);
  expect_shape(op, w, {N, K});
  expect_shape(op, y, {M, N});
  fp8_gemm(xq, fp8_quantize(w, true), y, accumulate);
}

void fp8_linear_backward_input(const Tensor& dy, const Tensor& w, const Tensor& dx, bool accumulate) {
  const char* op = "fp8_linear_backward_input";
  for (const Tensor* t : {&dy, &w, &dx}) check_2d(op, *t);
  const int64_t M = dy.dim(0), N = dy.dim(1), K = w.dim(1);
  expect_shape(op, w, {N, K});
  expect_shape(op, dx, {M, K});
  // w^T [K, N]: its 128 x 128 blocks are w's blocks transposed (same scales, same codes).
  fp8_gemm(fp8_quantize(dy, false), fp8_quantize_transposed(w, true, op), dx, accumulate);
}

void fp8_linear_backward_weight(const Tensor& dy, const Tensor& x, const Tensor& dw) {
  const char* op = "fp8_linear_backward_weight";
  for (const Tensor* t : {&dy, &x, &dw}) check_2d(op, *t);
  const int64_t M = dy.dim(0), N = dy.dim(1), K = x.dim(1);
  expect_shape(op, x, {M, K});
  expect_shape(op, dw, {N, K});
  // Reduction over the M tokens: dy^T [N, M] and x^T [K, M], both tiled along M.
  fp8_gemm(fp8_quantize_transposed(dy, false, op), fp8_quantize_transposed(x, false, op), dw,
           /*accumulate=*/true);
}

}  // namespace dsv3::ops
