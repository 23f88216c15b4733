// bf16 and FP8 E4M3 conversions and FP8 block scaling (core/lowp.hpp): every E4M3 code, the ties
// between neighbours, saturation, NaN, bf16 ties/subnormals/overflow. tests/unit/check_lowp.py
// compares the same conversions with ml_dtypes.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "core/lowp.hpp"

namespace dsv3::lowp {
namespace {

TEST(E4M3, EveryCodeDecodesAndRoundTrips) {
  int nans = 0;
  for (int c = 0; c < 256; ++c) {
    const float v = from_e4m3(static_cast<uint8_t>(c));
    if (std::isnan(v)) {
      ++nans;
      EXPECT_EQ(c & 0x7f, 0x7f) << c;
      continue;
    }
    EXPECT_EQ(to_e4m3(v), c) << "code " << c << " value " << v;
    EXPECT_EQ(std::signbit(v), (c & 0x80) != 0) << c;
  }
  EXPECT_EQ(nans, 2);
  EXPECT_EQ(from_e4m3(0x7e), 448.0f);
  EXPECT_EQ(from_e4m3(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(from_e4m3(0x07), std::ldexp(7.0f, -9));  // largest subnormal
  EXPECT_EQ(from_e4m3(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(from_e4m3(0x38), 1.0f);
  EXPECT_EQ(from_e4m3(0xb8), -1.0f);
  // Positive codes are strictly increasing.
  for (int c = 0; c < 126; ++c) EXPECT_LT(from_e4m3(c), from_e4m3(c + 1)) << c;
}

TEST(E4M3, TiesGoToEvenAndNeighboursToTheNearest) {
  for (int c = 0; c < 126; ++c) {
    const float lo = from_e4m3(c), hi = from_e4m3(c + 1);
    const float mid = (lo + hi) / 2;  // exact: 5 significant bits at most
    const int even = (c % 2 == 0) ? c : c + 1;
    EXPECT_EQ(to_e4m3(mid), even) << "tie between codes " << c << " and " << c + 1;
    EXPECT_EQ(to_e4m3(-mid), even | 0x80) << c;
    EXPECT_EQ(to_e4m3(std::nextafter(mid, 0.0f)), c) << c;
    EXPECT_EQ(to_e4m3(std::nextafter(mid, 1e9f)), c + 1) << c;
  }
  // Below half the smallest subnormal: zero, keeping the sign.
  EXPECT_EQ(to_e4m3(std::ldexp(1.0f, -10)), 0x00);  // tie with 0 -> even (0)
  EXPECT_EQ(to_e4m3(-std::ldexp(1.0f, -11)), 0x80);
  EXPECT_EQ(to_e4m3(std::numeric_limits<float>::denorm_min()), 0x00);
}

TEST(E4M3, SaturatesAndKeepsNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  for (float v : {448.0f, 448.5f, 463.9f, 464.0f, 480.0f, 1e4f, 3.4e38f, inf}) {
    EXPECT_EQ(to_e4m3(v), 0x7e) << v;
    EXPECT_EQ(to_e4m3(-v), 0xfe) << v;
  }
  EXPECT_EQ(to_e4m3(std::nanf("")), 0x7f);
  EXPECT_EQ(to_e4m3(-std::nanf("")), 0xff);
  EXPECT_EQ(to_e4m3(0.0f), 0x00);
  EXPECT_EQ(to_e4m3(-0.0f), 0x80);
}

// to_e4m3 is written branch-free (selects as masks, the subnormal rounding by adding 2^23) so that
// the quantizers' loops vectorise. Here it is held against a plain case-by-case reference on every
// bit pattern whose low 12 bits are one of the rounding-critical endings below (2^20 x 9 patterns:
// every exponent and high mantissa, ties and their neighbours), in scalar and in vector loops.
uint8_t e4m3_by_cases(float f) {
  const uint32_t u = bits_of(f);
  const uint8_t sign = (u >> 31) ? 0x80 : 0x00;
  const float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7f;
  if (a >= 448.0f) return sign | 0x7e;
  if (a < std::ldexp(1.0f, -6)) return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f));
  int e = 0;
  const float m = std::frexp(a, &e);              // a = m * 2^e, m in [0.5, 1)
  const float steps = std::nearbyint(m * 16.0f);  // 8..16 eighths of 2^(e-1), ties to even
  int exp_field = e - 1 + 7, mant = static_cast<int>(steps) - 8;
  if (mant == 8) ++exp_field, mant = 0;  // rounded up into the next binade
  return sign | static_cast<uint8_t>((exp_field << 3) | mant);
}

TEST(E4M3, BranchFreeConversionEqualsTheCaseByCaseReference) {
  const uint32_t endings[] = {0x000, 0x001, 0x7ff, 0x800, 0x801, 0xfff, 0x3ff, 0x400, 0xc00};
  std::vector<float> x(1u << 20);
  std::vector<uint8_t> q(x.size());
  int64_t bad = 0;
  for (uint32_t end : endings) {
    for (uint32_t hi = 0; hi < (1u << 20); ++hi) x[hi] = float_of((hi << 12) | end);
    for (size_t i = 0; i < x.size(); ++i) q[i] = to_e4m3(x[i]);  // a loop the compiler vectorises
    for (size_t i = 0; i < x.size(); ++i) {
      const uint8_t want = e4m3_by_cases(x[i]);
      if ((q[i] != want || to_e4m3(x[i]) != want) && bad++ < 5)
        ADD_FAILURE() << "bits " << std::hex << bits_of(x[i]) << ": " << int(q[i]) << " want " << int(want);
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST(BF16, RoundsToNearestEvenKeepsSubnormalsOverflowsToInfinity) {
  auto f = [](uint32_t u) { return float_of(u); };
  EXPECT_EQ(to_bf16(f(0x3f808000u)), 0x3f80);  // tie, even below
  EXPECT_EQ(to_bf16(f(0x3f818000u)), 0x3f82);  // tie, even above
  EXPECT_EQ(to_bf16(f(0x3f808001u)), 0x3f81);  // just above the tie
  EXPECT_EQ(to_bf16(f(0x3f807fffu)), 0x3f80);  // just below
  EXPECT_EQ(to_bf16(f(0x00018000u)), 0x0002);  // subnormal tie -> even
  EXPECT_EQ(to_bf16(f(0x00008000u)), 0x0000);  // half the smallest bf16 subnormal -> 0
  EXPECT_EQ(to_bf16(f(0x00008001u)), 0x0001);
  EXPECT_EQ(to_bf16(f(0x807f8000u)), 0x8080);   // negative subnormal rounding up into the normals
  EXPECT_EQ(to_bf16(f(0x7f7fffffu)), 0x7f80);   // FLT_MAX -> +inf
  EXPECT_EQ(to_bf16(f(0x7f7f7fffu)), 0x7f7f);   // largest finite bf16 stays
  EXPECT_EQ(to_bf16(f(0xff800000u)), 0xff80);   // -inf
  const uint16_t qn = to_bf16(f(0x7f800001u));  // signalling NaN whose payload would truncate to inf
  EXPECT_TRUE(std::isnan(from_bf16(qn)));
  EXPECT_EQ(qn & 0x0040, 0x0040);
  EXPECT_TRUE(std::isnan(from_bf16(to_bf16(f(0xffc00000u)))));
  EXPECT_EQ(to_bf16(f(0xffc00000u)) & 0x8000, 0x8000);
  // Every bf16 value converts back to itself.
  for (uint32_t h = 0; h < 65536; ++h) {
    const float v = from_bf16(static_cast<uint16_t>(h));
    if (!std::isnan(v)) {
      ASSERT_EQ(to_bf16(v), h) << h;
    }
  }
  std::vector<float> x = {1.00390625f, -3.0f, 1e-40f};
  round_bf16(x.data(), 3);
  EXPECT_EQ(x[0], 1.0f);  // 1 + 2^-8: a tie, even is 1
  EXPECT_EQ(x[1], -3.0f);
  EXPECT_EQ(x[2], from_bf16(to_bf16(1e-40f)));
}

TEST(Fp8Scaling, TilesScaleByTheirOwnAmax) {
  const int64_t rows = 3, cols = 300;  // tiles of 128, 128, 44
  std::mt19937 gen(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(rows * cols);
  for (auto& v : x) v = nd(gen);
  for (int64_t c = 128; c < 256; ++c) x[1 * cols + c] *= 1000.0f;  // one loud tile
  for (int64_t c = 256; c < 300; ++c) x[2 * cols + c] = 0.0f;      // one silent tile
  std::vector<uint8_t> q(x.size());
  std::vector<float> s(rows * tiles(cols)), back(x.size());
  quantize_tiles(x.data(), rows, cols, q.data(), s.data());
  dequantize_tiles(q.data(), s.data(), rows, cols, back.data());
  ASSERT_EQ(tiles(cols), 3);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < 3; ++t) {
      float amax = 0;
      for (int64_t c = t * 128; c < std::min<int64_t>(cols, (t + 1) * 128); ++c)
        amax = std::max(amax, std::fabs(x[r * cols + c]));
      EXPECT_EQ(s[r * 3 + t], amax > 0 ? amax / 448.0f : 1.0f) << r << "," << t;
    }
  for (size_t i = 0; i < x.size(); ++i) {
    const float scale = s[(i / cols) * 3 + (i % cols) / 128];
    // Relative error 2^-4 for normals, absolute 2^-10 * scale in the subnormal range.
    EXPECT_LE(std::fabs(back[i] - x[i]), std::max(std::fabs(x[i]) / 16.0f, std::ldexp(scale, -10)) * 1.0001f)
        << i;
  }
  for (int64_t c = 256; c < 300; ++c) EXPECT_EQ(back[2 * cols + c], 0.0f);
  // The element holding the amax maps to the largest code (448 * scale ~ amax).
  int64_t arg = 128;
  for (int64_t c = 128; c < 256; ++c)
    if (std::fabs(x[cols + c]) > std::fabs(x[cols + arg])) arg = c;
  EXPECT_EQ(q[cols + arg] & 0x7f, 0x7e);
}

TEST(Fp8Scaling, TransposedTilesEqualTheTilesOfTheTranspose) {
  // quantize_tiles_transposed(x) must give, bit for bit, quantize_tiles of x's transpose: ragged
  // tiles, an all-zero tile, NaN, infinity, negative zero and subnormals included.
  std::mt19937 gen(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {300, 5}, {130, 257}, {128, 64}, {7, 300}}) {
    std::vector<float> x(rows * cols);
    for (auto& v : x) v = nd(gen);
    x[0] = -0.0f;
    if (rows * cols > 10) {
      x[rows * cols / 2] = std::numeric_limits<float>::quiet_NaN();
      x[rows * cols / 3] = -std::numeric_limits<float>::infinity();
      x[rows * cols - 1] = std::numeric_limits<float>::denorm_min();
    }
    if (rows > 128)
      for (int64_t r = 128; r < rows; ++r) x[r * cols + cols - 1] = 0.0f;  // one silent tile
    std::vector<float> xt(x.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) xt[c * rows + r] = x[r * cols + c];
    std::vector<uint8_t> q1(x.size()), q2(x.size());
    std::vector<float> s1(cols * tiles(rows)), s2(cols * tiles(rows));
    quantize_tiles(xt.data(), cols, rows, q1.data(), s1.data());
    quantize_tiles_transposed(x.data(), rows, cols, q2.data(), s2.data());
    for (size_t i = 0; i < q1.size(); ++i) ASSERT_EQ(q1[i], q2[i]) << rows << "x" << cols << " code " << i;
    for (size_t i = 0; i < s1.size(); ++i)
      ASSERT_EQ(bits_of(s1[i]), bits_of(s2[i])) << rows << "x" << cols << " scale " << i;
  }
}

// Shapes with ragged tiles and blocks, and values with -0, NaN, infinity and subnormals.
std::vector<float> awkward_values(int64_t rows, int64_t cols, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(rows * cols);
  for (auto& v : x) v = nd(gen) * std::exp(2.0f * nd(gen));
  x[0] = -0.0f;
  if (rows * cols > 10) {
    x[rows * cols / 2] = std::numeric_limits<float>::quiet_NaN();
    x[rows * cols / 3] = -std::numeric_limits<float>::infinity();
    x[rows * cols - 1] = 1e-40f;
  }
  return x;
}

TEST(Fp8Scaling, TransposedBlocksEqualTheBlocksOfTheTranspose) {
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {300, 5}, {130, 257}, {128, 256}, {7, 300}}) {
    const std::vector<float> x = awkward_values(rows, cols, 12);
    std::vector<float> xt(x.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) xt[c * rows + r] = x[r * cols + c];
    std::vector<uint8_t> q1(x.size()), q2(x.size());
    std::vector<float> s1(tiles(rows) * tiles(cols)), s2(s1.size());
    quantize_blocks(xt.data(), cols, rows, q1.data(), s1.data());
    quantize_blocks_transposed(x.data(), rows, cols, q2.data(), s2.data());
    for (size_t i = 0; i < q1.size(); ++i) ASSERT_EQ(q1[i], q2[i]) << rows << "x" << cols << " code " << i;
    for (size_t i = 0; i < s1.size(); ++i)
      ASSERT_EQ(bits_of(s1[i]), bits_of(s2[i])) << rows << "x" << cols << " scale " << i;
  }
}

// bf16 input (bit patterns) is quantized bit for bit as its f32 values are, by every quantizer.
TEST(Fp8Scaling, Bf16InputQuantizesAsItsF32Values) {
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {300, 5}, {130, 257}, {128, 256}, {7, 300}}) {
    const std::vector<float> x = awkward_values(rows, cols, 13);
    std::vector<uint16_t> h(x.size());
    to_bf16(x.data(), h.data(), static_cast<int64_t>(x.size()));
    std::vector<float> f(x.size());
    from_bf16(h.data(), f.data(), static_cast<int64_t>(x.size()));
    const auto same = [&](const char* what, auto&& quantize, int64_t n_scales) {
      std::vector<uint8_t> q1(x.size()), q2(x.size());
      std::vector<float> s1(n_scales), s2(n_scales);
      quantize(f.data(), q1.data(), s1.data());
      quantize(h.data(), q2.data(), s2.data());
      for (size_t i = 0; i < q1.size(); ++i)
        ASSERT_EQ(q1[i], q2[i]) << what << " " << rows << "x" << cols << " " << i;
      for (int64_t i = 0; i < n_scales; ++i)
        ASSERT_EQ(bits_of(s1[i]), bits_of(s2[i])) << what << " " << rows << "x" << cols << " scale " << i;
    };
    same(
        "tiles", [&](const auto* v, uint8_t* q, float* s) { quantize_tiles(v, rows, cols, q, s); },
        rows * tiles(cols));
    same(
        "blocks", [&](const auto* v, uint8_t* q, float* s) { quantize_blocks(v, rows, cols, q, s); },
        tiles(rows) * tiles(cols));
    same(
        "blocks^T",
        [&](const auto* v, uint8_t* q, float* s) { quantize_blocks_transposed(v, rows, cols, q, s); },
        tiles(rows) * tiles(cols));
    std::vector<uint8_t> work(static_cast<size_t>(tiles_transposed_work_bytes(rows, cols)));
    same(
        "tiles^T",
        [&](const auto* v, uint8_t* q, float* s) { quantize_tiles_transposed(v, rows, cols, q, s); },
        cols * tiles(rows));
    same(
        "tiles^T with work",
        [&](const auto* v, uint8_t* q, float* s) {
          quantize_tiles_transposed(v, rows, cols, q, s, work.data());
        },
        cols * tiles(rows));
  }
}

TEST(Fp8Scaling, BlocksScaleByTheirOwnAmax) {
  const int64_t rows = 130, cols = 257;  // 2 x 3 blocks, ragged at the edges
  std::vector<float> w(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) w[i] = std::sin(0.37f * static_cast<float>(i)) * (1 + (i % 7));
  w[129 * cols + 256] = 90.0f;  // the corner block's maximum
  std::vector<uint8_t> q(w.size());
  std::vector<float> s(tiles(rows) * tiles(cols)), back(w.size());
  quantize_blocks(w.data(), rows, cols, q.data(), s.data());
  dequantize_blocks(q.data(), s.data(), rows, cols, back.data());
  EXPECT_EQ(s[1 * 3 + 2], 90.0f / 448.0f);
  EXPECT_EQ(back[129 * cols + 256], 90.0f);
  for (int64_t br = 0; br < 2; ++br)
    for (int64_t bc = 0; bc < 3; ++bc) {
      float amax = 0;
      for (int64_t r = br * 128; r < std::min<int64_t>(rows, br * 128 + 128); ++r)
        for (int64_t c = bc * 128; c < std::min<int64_t>(cols, bc * 128 + 128); ++c)
          amax = std::max(amax, std::fabs(w[r * cols + c]));
      EXPECT_EQ(s[br * 3 + bc], amax / 448.0f);
    }
  for (size_t i = 0; i < w.size(); ++i) {
    const float scale = s[((i / cols) / 128) * 3 + (i % cols) / 128];
    EXPECT_LE(std::fabs(back[i] - w[i]), std::max(std::fabs(w[i]) / 16.0f, std::ldexp(scale, -10)) * 1.0001f);
  }
}

// Stochastic rounding: every result is one of the two E4M3 neighbours of v (v itself on the grid),
// the upper one exactly when u * (upper - lower) < v - lower; so u below the fraction rounds up and
// u above it rounds down, and over uniform u the mean is v.
TEST(E4M3Stochastic, PicksANeighbourWithTheProbabilityThatMakesItUnbiased) {
  const float* tab = e4m3_table();
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> mag(-9.0f, 8.8f), uni(0.0f, 1.0f);
  for (int i = 0; i < 20000; ++i) {
    const float v = (i % 2 ? -1.0f : 1.0f) * std::exp2(mag(rng)) * (i % 7 == 0 ? 0.0f : 1.0f);
    const float a = std::fabs(v);
    if (a > 448.0f) continue;
    // The neighbours by a scan of the positive codes.
    float lo = 0, hi = 448;
    for (int c = 0; c <= 0x7e; ++c) {
      if (tab[c] <= a) lo = tab[c];
      if (tab[c] >= a) {
        hi = tab[c];
        break;
      }
    }
    const float u = uni(rng), r = round_e4m3_stochastic(v, u);
    if (lo == hi) {
      EXPECT_EQ(r, v) << "a value on the grid moved";
      continue;
    }
    const float expect = u * (hi - lo) < a - lo ? hi : lo;
    ASSERT_EQ(r, std::copysign(expect, v)) << v << " u " << u;
    EXPECT_EQ(round_e4m3_stochastic(v, 0.0f), std::copysign(hi, v)) << v;
    EXPECT_EQ(round_e4m3_stochastic(v, 0.999999f), std::copysign(lo, v)) << v;
  }
  EXPECT_TRUE(std::isnan(round_e4m3_stochastic(std::nanf(""), 0.5f)));
  EXPECT_EQ(round_e4m3_stochastic(1000.0f, 0.5f), 448.0f);
}

// fp8_round_stochastic on a tile of one repeated value (and its amax): round to nearest always lands
// on the same neighbour, stochastic rounding averages to the value itself; the same key gives the same
// values and another key others.
TEST(E4M3Stochastic, TilesRoundWithoutBiasAndReproducibly) {
  const int64_t rows = 64, cols = 256;
  const float v = 1.3f;  // between the E4M3 values 1.25 and 1.375 under scale 1 (amax 448)
  std::vector<float> x(static_cast<size_t>(rows * cols), v);
  for (int64_t r = 0; r < rows; ++r) x[r * cols] = x[r * cols + 128] = 448.0f;
  for (const bool blocks : {false, true}) {
    std::vector<float> a = x, b = x, c = x;
    fp8_round_stochastic(a.data(), rows, cols, blocks, 7);
    fp8_round_stochastic(b.data(), rows, cols, blocks, 7);
    fp8_round_stochastic(c.data(), rows, cols, blocks, 8);
    EXPECT_EQ(a, b);
    EXPECT_NE(a, c);
    double sum = 0;
    int64_t n = 0, up = 0;
    for (int64_t i = 0; i < rows * cols; ++i) {
      if (x[i] != v) {
        EXPECT_EQ(a[i], 448.0f);
        continue;
      }
      ASSERT_TRUE(a[i] == 1.25f || a[i] == 1.375f) << a[i];
      sum += a[i], ++n, up += a[i] == 1.375f;
    }
    // P(up) = 0.4: the mean is v within a few standard errors (0.0625 * 0.49 / sqrt(n)).
    EXPECT_NEAR(sum / n, v, 4 * 0.0625 * 0.49 / std::sqrt(double(n))) << "blocks " << blocks;
    EXPECT_GT(up, 0);
    EXPECT_EQ(from_e4m3(to_e4m3(v)), 1.25f);  // nearest: always down, a bias of -0.05
  }
}

}  // namespace
}  // namespace dsv3::lowp
