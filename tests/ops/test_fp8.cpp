// The FP8 GEMMs (kernels/ops.hpp "FP8 linear layers") and bf16 operands of the linear ops against
// naive double references:
//  - fp8_gemm equals the double product of the dequantized operands up to fp32 summation error;
//  - each of Fprop, Dgrad and Wgrad is within the error bound E4M3 implies of the exact product of
//    the unquantized operands, with the tiling the recipe prescribes (an outlier only coarsens its
//    own tile), and far from it when the roles of the tiles are swapped;
//  - bf16 inputs give exactly the f32 GEMM of their values, and the FP8 GEMMs quantize bf16 operands
//    exactly as their f32 values;
//  - Fprop from cached codes (the FP8 KV cache) is Fprop of the input they were quantized from.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/lowp.hpp"
#include "ops.hpp"

namespace dsv3 {
namespace {

OwnedTensor random_matrix(int64_t r, int64_t c, uint64_t seed, const char* name, float outlier = 0) {
  OwnedTensor t(DType::F32, {r, c}, name);
  std::mt19937_64 g(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  float* p = t.f32();
  for (int64_t i = 0; i < r * c; ++i) p[i] = nd(g);
  if (outlier != 0) p[(r / 2) * c + c / 3] = outlier;  // one loud element
  return t;
}

// Dequantized copy of an operand.
std::vector<double> dequant(const ops::Fp8Operand& q) {
  const int64_t r = q.rows(), k = q.k();
  std::vector<float> out(static_cast<size_t>(r * k));
  const auto* codes = static_cast<const uint8_t*>(q.codes.t.data());
  if (q.blocks)
    lowp::dequantize_blocks(codes, q.scales.f32(), r, k, out.data());
  else
    lowp::dequantize_tiles(codes, q.scales.f32(), r, k, out.data());
  return {out.begin(), out.end()};
}

// E4M3 rounding: relative error <= 2^-4 for normals, absolute <= 2^-10 * scale below 2^-6 * scale.
double quant_err(double v, double scale) { return std::max(std::fabs(v) / 16.0, std::ldexp(scale, -10)); }

// Per element of a[M,K] . b[N,K]^T: the exact double product, and the bound sum_k (|a||eb| + |ea||b| +
// |ea||eb|) + fp32 summation (K * 2^-23 * sum |a||b|), with ea/eb the quantization bounds above.
struct Expected {
  std::vector<double> exact, bound;
};
Expected expect_product(const std::vector<float>& a, const std::vector<double>& ea,
                        const std::vector<float>& b, const std::vector<double>& eb, int64_t M, int64_t N,
                        int64_t K) {
  Expected e{std::vector<double>(M * N), std::vector<double>(M * N)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0, bound = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double x = a[m * K + k], y = b[n * K + k], dx = ea[m * K + k], dy = eb[n * K + k];
        s += x * y;
        bound += std::fabs(x) * dy + dx * std::fabs(y) + dx * dy;
        mag += std::fabs(x * y);
      }
      e.exact[m * N + n] = s;
      e.bound[m * N + n] = bound + (K + 8) * std::ldexp(mag + bound, -23);
    }
  return e;
}

// Quantization error bounds of a [rows, K] operand under tiles (per row, 128 along K) or blocks.
std::vector<double> quant_bounds(const std::vector<float>& a, int64_t rows, int64_t K, bool blocks) {
  std::vector<double> err(a.size());
  const int64_t kt = lowp::tiles(K);
  std::vector<float> amax(static_cast<size_t>((blocks ? lowp::tiles(rows) : rows) * kt), 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) {
      float& m = amax[(blocks ? r / 128 : r) * kt + k / 128];
      m = std::max(m, std::fabs(a[r * K + k]));
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k)
      err[r * K + k] = quant_err(a[r * K + k], lowp::fp8_scale(amax[(blocks ? r / 128 : r) * kt + k / 128]));
  return err;
}

std::vector<float> values(const Tensor& t) { return {t.f32(), t.f32() + t.numel()}; }
std::vector<float> transpose(const std::vector<float>& a, int64_t r, int64_t c) {
  std::vector<float> t(a.size());
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) t[j * r + i] = a[i * c + j];
  return t;
}

// Checks out against the expectation; returns the relative RMS error against the exact product.
double check_within(const Tensor& out, const Expected& e, const char* what) {
  double worst = 0, se = 0, sx = 0;
  int bad = 0;
  for (int64_t i = 0; i < out.numel(); ++i) {
    const double d = std::fabs(out.f32()[i] - e.exact[i]);
    worst = std::max(worst, d / e.bound[i]);
    if (d > e.bound[i] && bad++ < 3)
      ADD_FAILURE() << what << ": element " << i << " = " << out.f32()[i] << ", exact " << e.exact[i]
                    << ", error " << d << " > bound " << e.bound[i];
    se += d * d, sx += e.exact[i] * e.exact[i];
  }
  EXPECT_LT(worst, 1.0) << what;
  return std::sqrt(se / sx);
}

TEST(Fp8Gemm, EqualsTheProductOfTheDequantizedOperands) {
  const int64_t M = 37, N = 131, K = 300;  // ragged tiles and blocks
  OwnedTensor a = random_matrix(M, K, 1, "a"), b = random_matrix(N, K, 2, "b", 40.0f);
  for (bool blocks : {false, true}) {
    const ops::Fp8Operand qa = ops::fp8_quantize(a, false), qb = ops::fp8_quantize(b, blocks);
    const std::vector<double> da = dequant(qa), db = dequant(qb);
    OwnedTensor c(DType::F32, {M, N}, "c");
    for (int64_t i = 0; i < M * N; ++i) c.f32()[i] = 0.5f;
    ops::fp8_gemm(qa, qb, c, /*accumulate=*/true);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k)
          s += da[m * K + k] * db[n * K + k], mag += std::fabs(da[m * K + k] * db[n * K + k]);
        ASSERT_NEAR(c.f32()[m * N + n], 0.5 + s, (K + 8) * std::ldexp(mag + 1, -23)) << m << "," << n;
      }
  }
}

TEST(Fp8Linear, ThreeGemmsWithinTheFormatBoundWithTheirTiling) {
  const int64_t M = 150, N = 140, K = 260;
  // An outlier in x and dy (one token, one channel) and in w (one weight).
  OwnedTensor x = random_matrix(M, K, 3, "x", 300.0f), w = random_matrix(N, K, 4, "w", 25.0f),
              dy = random_matrix(M, N, 5, "dy", -200.0f);
  const auto xv = values(x), wv = values(w), dyv = values(dy);

  // Fprop: x tiles along K, w blocks.
  OwnedTensor y(DType::F32, {M, N}, "y");
  ops::fp8_linear_forward(x, w, y);
  const double e_f = check_within(
      y, expect_product(xv, quant_bounds(xv, M, K, false), wv, quant_bounds(wv, N, K, true), M, N, K),
      "fprop");

  // Dgrad: dx = dy . w; dy tiles along N, w^T blocks.
  OwnedTensor dx(DType::F32, {M, K}, "dx");
  ops::fp8_linear_backward_input(dy, w, dx);
  const auto wt = transpose(wv, N, K);
  const double e_d = check_within(
      dx, expect_product(dyv, quant_bounds(dyv, M, N, false), wt, quant_bounds(wt, K, N, true), M, K, N),
      "dgrad");

  // Wgrad: dw += dy^T . x; both tiled along M.
  OwnedTensor dw(DType::F32, {N, K}, "dw");
  ops::fp8_linear_backward_weight(dy, x, dw);
  const auto dyt = transpose(dyv, M, N), xt = transpose(xv, M, K);
  const double e_w = check_within(
      dw, expect_product(dyt, quant_bounds(dyt, N, M, false), xt, quant_bounds(xt, K, M, false), N, K, M),
      "wgrad");

  // Quantization really happened (E4M3 has 3 mantissa bits: relative RMS errors of a few percent).
  for (double e : {e_f, e_d, e_w}) {
    EXPECT_GT(e, 1e-3);
    EXPECT_LT(e, 8e-2);
  }
  std::printf("fp8 relative RMS error vs exact: fprop %.4f, dgrad %.4f, wgrad %.4f\n", e_f, e_d, e_w);
}

TEST(Fp8Linear, BackwardPassesAreTheGemmsOfTheQuantizedTransposes) {
  // Dgrad and Wgrad quantize transposed operands without forming them in f32; the result must be bit
  // for bit the GEMM of the quantized explicit transposes.
  const int64_t M = 150, N = 140, K = 260;
  OwnedTensor x = random_matrix(M, K, 12, "x", 300.0f), w = random_matrix(N, K, 13, "w", 25.0f),
              dy = random_matrix(M, N, 14, "dy", -200.0f);
  auto explicit_t = [](const OwnedTensor& a) {
    const int64_t r = a.t.dim(0), c = a.t.dim(1);
    OwnedTensor t(DType::F32, {c, r}, a.t.name() + "T");
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j) t.f32()[j * r + i] = a.f32()[i * c + j];
    return t;
  };
  OwnedTensor dx(DType::F32, {M, K}, "dx"), dx_ref(DType::F32, {M, K}, "dx_ref");
  ops::fp8_linear_backward_input(dy, w, dx);
  ops::fp8_gemm(ops::fp8_quantize(dy, false), ops::fp8_quantize(explicit_t(w), true), dx_ref, false);
  for (int64_t i = 0; i < M * K; ++i) ASSERT_EQ(dx.f32()[i], dx_ref.f32()[i]) << "dgrad " << i;
  OwnedTensor dw(DType::F32, {N, K}, "dw"), dw_ref(DType::F32, {N, K}, "dw_ref");
  for (int64_t i = 0; i < N * K; ++i) dw.f32()[i] = dw_ref.f32()[i] = 0.25f * static_cast<float>(i % 7);
  ops::fp8_linear_backward_weight(dy, x, dw);
  ops::fp8_gemm(ops::fp8_quantize(explicit_t(dy), false), ops::fp8_quantize(explicit_t(x), false), dw_ref,
                true);
  for (int64_t i = 0; i < N * K; ++i) ASSERT_EQ(dw.f32()[i], dw_ref.f32()[i]) << "wgrad " << i;
}

TEST(Fp8Linear, WrongTilingBreaksTheBound) {
  // The bound is tight enough to tell the tilings apart: quantizing x per 128 x 128 block lets the
  // outlier coarsen the other tokens of its block beyond the per-token-tile bound.
  const int64_t M = 128, N = 64, K = 128;
  OwnedTensor x = random_matrix(M, K, 6, "x", 1e6f), w = random_matrix(N, K, 7, "w");
  const auto xv = values(x), wv = values(w);
  OwnedTensor y(DType::F32, {M, N}, "y");
  ops::fp8_gemm(ops::fp8_quantize(x, false), ops::fp8_quantize(w, true), y, false);
  const Expected e =
      expect_product(xv, quant_bounds(xv, M, K, false), wv, quant_bounds(wv, N, K, true), M, N, K);
  check_within(y, e, "tiles");
  // The same with x treated as one block: rows far from the outlier lose most of their bits.
  ops::Fp8Operand xb = ops::fp8_quantize(x, true);
  xb.blocks = false;  // reinterpret the block scale as each row's tile scale
  xb.scales = OwnedTensor(DType::F32, {M, 1}, "s");
  const ops::Fp8Operand blk = ops::fp8_quantize(x, true);
  for (int64_t m = 0; m < M; ++m) xb.scales.f32()[m] = blk.scales.f32()[0];
  ops::fp8_gemm(xb, ops::fp8_quantize(w, true), y, false);
  int outside = 0;
  for (int64_t i = 0; i < M * N; ++i) outside += std::fabs(y.f32()[i] - e.exact[i]) > e.bound[i];
  EXPECT_GT(outside, M * N / 4) << "block-scaled activations should violate the tile bound";
}

TEST(Fp8Linear, FpropFromCachedCodesIsFpropOfTheirSource) {
  // The FP8 KV cache hands kv_b_proj the codes it keeps; the result must be that of the input they
  // were quantized from, bit for bit, with accumulation as well.
  const int64_t M = 70, N = 90, K = 300;
  OwnedTensor x = random_matrix(M, K, 15, "x", 60.0f), w = random_matrix(N, K, 16, "w", 9.0f);
  OwnedTensor y(DType::F32, {M, N}, "y"), y_q(DType::F32, {M, N}, "y_q");
  for (int64_t i = 0; i < M * N; ++i) y.f32()[i] = y_q.f32()[i] = 0.125f * static_cast<float>(i % 5);
  ops::fp8_linear_forward(x, w, y, /*accumulate=*/true);
  ops::fp8_linear_forward(ops::fp8_quantize(x, false), w, y_q, /*accumulate=*/true);
  for (int64_t i = 0; i < M * N; ++i) ASSERT_EQ(y.f32()[i], y_q.f32()[i]) << i;
  // Block-scaled activations and a K that does not match are refused.
  EXPECT_THROW(ops::fp8_linear_forward(ops::fp8_quantize(x, true), w, y_q), std::exception);
  OwnedTensor w_short = random_matrix(N, K - 1, 17, "w_short");
  EXPECT_THROW(ops::fp8_linear_forward(ops::fp8_quantize(x, false), w_short, y_q), std::exception);
}

OwnedTensor as_bf16(const OwnedTensor& t) {
  OwnedTensor h(DType::BF16, t.t.shape(), t.t.name() + "_bf16");
  lowp::to_bf16(t.f32(), static_cast<uint16_t*>(h.t.data()), t.t.numel());
  return h;
}

// The three passes of a linear layer (fwd, dgrad, wgrad, each as the ops take their arguments) on f32
// operands holding bf16 values and on their bf16 copies: the same bits. Returns the f32 operands
// x [M, K], w [N, K], dy [M, N].
template <typename Fwd, typename Dgrad, typename Wgrad>
std::vector<OwnedTensor> expect_bf16_operands_act_as_their_values(int64_t M, int64_t N, int64_t K,
                                                                  uint64_t seed, Fwd fwd, Dgrad dgrad,
                                                                  Wgrad wgrad) {
  OwnedTensor x = random_matrix(M, K, seed, "x"), w = random_matrix(N, K, seed + 1, "w"),
              dy = random_matrix(M, N, seed + 2, "dy");
  for (OwnedTensor* t : {&x, &w, &dy}) lowp::round_bf16(t->f32(), t->t.numel());
  const OwnedTensor xh = as_bf16(x), wh = as_bf16(w), dyh = as_bf16(dy);
  OwnedTensor y1(DType::F32, {M, N}), y2(DType::F32, {M, N}), dx1(DType::F32, {M, K}),
      dx2(DType::F32, {M, K}), dw1(DType::F32, {N, K}), dw2(DType::F32, {N, K});
  fwd(x, w, y1);
  fwd(xh, wh, y2);
  dgrad(dy, w, dx1);
  dgrad(dyh, wh, dx2);
  wgrad(dy, x, dw1);
  wgrad(dyh, xh, dw2);
  EXPECT_EQ(std::memcmp(y1.f32(), y2.f32(), M * N * 4), 0) << "forward";
  EXPECT_EQ(std::memcmp(dx1.f32(), dx2.f32(), M * K * 4), 0) << "input gradient";
  EXPECT_EQ(std::memcmp(dw1.f32(), dw2.f32(), N * K * 4), 0) << "weight gradient";
  std::vector<OwnedTensor> out;
  out.push_back(std::move(x)), out.push_back(std::move(w)), out.push_back(std::move(dy));
  return out;
}

TEST(Bf16Linear, Bf16OperandsGiveTheF32GemmOfTheirValues) {
  const auto xw = expect_bf16_operands_act_as_their_values(
      19, 23, 45, 8, [](const Tensor& x, const Tensor& w, const Tensor& y) { ops::linear_forward(x, w, y); },
      [](const Tensor& dy, const Tensor& w, const Tensor& dx) { ops::linear_backward_input(dy, w, dx); },
      [](const Tensor& dy, const Tensor& x, const Tensor& dw) { ops::linear_backward_weight(dy, x, dw); });
  // An output in bf16 is refused (outputs are f32; callers round).
  const OwnedTensor y(DType::F32, {19, 23});
  EXPECT_THROW(ops::linear_forward(xw[0], xw[1], as_bf16(y)), std::exception);
}

// The FP8 GEMMs quantize bf16 operands (compute weights, saved activations) straight from their bits:
// the same codes, scales and results as their f32 values, in every pass, with ragged tiles.
TEST(Fp8Linear, Bf16OperandsQuantizeAsTheirF32Values) {
  const int64_t M = 150, N = 140, K = 200;
  const auto xw = expect_bf16_operands_act_as_their_values(
      M, N, K, 11,
      [](const Tensor& x, const Tensor& w, const Tensor& y) { ops::fp8_linear_forward(x, w, y); },
      [](const Tensor& dy, const Tensor& w, const Tensor& dx) { ops::fp8_linear_backward_input(dy, w, dx); },
      [](const Tensor& dy, const Tensor& x, const Tensor& dw) {
        ops::fp8_linear_backward_weight(dy, x, dw);
      });
  const ops::Fp8Operand q1 = ops::fp8_quantize(xw[0], false), q2 = ops::fp8_quantize(as_bf16(xw[0]), false);
  EXPECT_EQ(std::memcmp(q1.codes.t.data(), q2.codes.t.data(), M * K), 0);
  EXPECT_EQ(std::memcmp(q1.scales.f32(), q2.scales.f32(), q1.scales.t.bytes()), 0);
  // Any other dtype is refused, naming the tensor.
  const OwnedTensor ids(DType::I32, {M, K}, "token_ids");
  OwnedTensor y(DType::F32, {M, N});
  try {
    ops::fp8_linear_forward(ids, xw[1], y);
    ADD_FAILURE() << "an i32 operand was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("token_ids"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dsv3
