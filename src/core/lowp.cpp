// Implementation of lowp.hpp.
#include "core/lowp.hpp"

#include <algorithm>
#include <array>
#include <cmath>

namespace dsv3::lowp {

void to_bf16(const float* x, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_bf16(x[i]);
}

void from_bf16(const uint16_t* h, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_bf16(h[i]);
}

void round_bf16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = round_bf16(x[i]);
}

uint8_t to_e4m3(float f) {
  const uint32_t u = bits_of(f);
  const auto sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7f;                      // NaN
  if (a >= bits_of(kE4M3Max)) return sign | 0x7e;               // 448 and beyond (infinity too): saturate
  if (a < 0x3c800000u) {                                        // below 2^-6: subnormal steps of 2^-9
    const float steps = float_of(a) * 512.0f;                   // exact (power of two)
    return sign | static_cast<uint8_t>(std::nearbyint(steps));  // 0..8 (8 is the smallest normal)
  }
  // Normal: round the 23 mantissa bits to 3, to nearest even; a carry moves into the exponent.
  const uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
  return sign | static_cast<uint8_t>((r >> 20) - ((127u - 7u) << 3));
}

namespace {
std::array<float, 256> make_e4m3_table() {
  std::array<float, 256> t{};
  for (int c = 0; c < 256; ++c) {
    const int e = (c >> 3) & 15, m = c & 7;
    float v;
    if (e == 15 && m == 7)
      v = std::nanf("");
    else if (e == 0)
      v = std::ldexp(static_cast<float>(m), -9);
    else
      v = std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
    t[c] = (c & 0x80) ? -v : v;
  }
  return t;
}
const std::array<float, 256>& table() {
  static const std::array<float, 256> t = make_e4m3_table();
  return t;
}
}  // namespace

const float* e4m3_table() { return table().data(); }
float from_e4m3(uint8_t q) { return table()[q]; }

namespace {
float amax_of(const float* x, int64_t n, int64_t stride, int64_t rows) {
  float m = 0.0f;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) {
      const float a = std::fabs(x[r * stride + i]);
      m = a > m ? a : m;  // NaN never wins: it is encoded as NaN below
    }
  return m;
}
}  // namespace

void quantize_tiles(const float* x, int64_t rows, int64_t cols, uint8_t* q, float* scales) {
  const int64_t nt = tiles(cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t c0 = t * kFp8Tile, w = std::min(kFp8Tile, cols - c0);
      const float* src = x + r * cols + c0;
      const float s = fp8_scale(amax_of(src, w, 0, 1));
      scales[r * nt + t] = s;
      for (int64_t i = 0; i < w; ++i) q[r * cols + c0 + i] = to_e4m3(src[i] / s);
    }
}

void quantize_blocks(const float* w, int64_t rows, int64_t cols, uint8_t* q, float* scales) {
  const int64_t nr = tiles(rows), nc = tiles(cols);
  for (int64_t br = 0; br < nr; ++br)
    for (int64_t bc = 0; bc < nc; ++bc) {
      const int64_t r0 = br * kFp8Tile, c0 = bc * kFp8Tile;
      const int64_t h = std::min(kFp8Tile, rows - r0), wd = std::min(kFp8Tile, cols - c0);
      const float s = fp8_scale(amax_of(w + r0 * cols + c0, wd, cols, h));
      scales[br * nc + bc] = s;
      for (int64_t r = r0; r < r0 + h; ++r)
        for (int64_t c = c0; c < c0 + wd; ++c) q[r * cols + c] = to_e4m3(w[r * cols + c] / s);
    }
}

void dequantize_tiles(const uint8_t* q, const float* scales, int64_t rows, int64_t cols, float* out) {
  const int64_t nt = tiles(cols);
  const float* tab = e4m3_table();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      out[r * cols + c] = tab[q[r * cols + c]] * scales[r * nt + c / kFp8Tile];
}

void dequantize_blocks(const uint8_t* q, const float* scales, int64_t rows, int64_t cols, float* out) {
  const int64_t nc = tiles(cols);
  const float* tab = e4m3_table();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      out[r * cols + c] = tab[q[r * cols + c]] * scales[(r / kFp8Tile) * nc + c / kFp8Tile];
}

}  // namespace dsv3::lowp
