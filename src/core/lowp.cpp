// Implementation of lowp.hpp.
#include "core/lowp.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

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
// Element access for the quantizers, which read f32 or bf16 (bit patterns) input: the value as f32
// (exact for bf16) and its magnitude's bit pattern, where magnitudes order as unsigned integers.
inline float value_of(float v) { return v; }
inline float value_of(uint16_t h) { return from_bf16(h); }
inline uint32_t magnitude_bits(float v) { return bits_of(v) & 0x7fffffffu; }
inline uint32_t magnitude_bits(uint16_t h) { return (static_cast<uint32_t>(h) << 16) & 0x7fffffffu; }

// The largest magnitude of n values (0 if none; NaN never wins: it is encoded as NaN later). On the
// bit patterns, so that the loop vectorises.
template <typename T>
uint32_t amax_bits(const T* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t a = magnitude_bits(x[i]);
    a = a > 0x7f800000u ? 0u : a;
    m = a > m ? a : m;
  }
  return m;
}

// q[i] = to_e4m3(x[i] / s).
template <typename T>
void encode(const T* x, int64_t n, float s, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = to_e4m3(value_of(x[i]) / s);
}

template <typename T>
void tiles_impl(const T* x, int64_t rows, int64_t cols, uint8_t* q, float* scales) {
  const int64_t nt = tiles(cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t c0 = t * kFp8Tile, w = std::min(kFp8Tile, cols - c0);
      const T* src = x + r * cols + c0;
      const float s = fp8_scale(float_of(amax_bits(src, w)));
      scales[r * nt + t] = s;
      encode(src, w, s, q + r * cols + c0);
    }
}

template <typename T>
void tiles_transposed_impl(const T* x, int64_t rows, int64_t cols, uint8_t* q, float* scales, uint8_t* work) {
  // Per tile of 128 rows of x: every column's amax (rows of x are contiguous), then the codes of the
  // tile, row by row, into a [h, cols] buffer that is transposed into q.
  const int64_t nt = tiles(rows);
  std::vector<uint8_t> own;
  if (!work) {
    own.resize(static_cast<size_t>(tiles_transposed_work_bytes(rows, cols)));
    work = own.data();
  }
  auto* amax = reinterpret_cast<uint32_t*>(work);
  auto* scale = reinterpret_cast<float*>(work + 4 * cols);
  uint8_t* codes = work + 8 * cols;
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t r0 = t * kFp8Tile, h = std::min(kFp8Tile, rows - r0);
    std::fill(amax, amax + cols, 0u);
    for (int64_t r = r0; r < r0 + h; ++r) {
      const T* row = x + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        uint32_t a = magnitude_bits(row[c]);
        a = a > 0x7f800000u ? 0u : a;
        amax[c] = a > amax[c] ? a : amax[c];
      }
    }
    for (int64_t c = 0; c < cols; ++c) {
      scale[c] = fp8_scale(float_of(amax[c]));
      scales[c * nt + t] = scale[c];
    }
    for (int64_t r = 0; r < h; ++r) {
      const T* row = x + (r0 + r) * cols;
      uint8_t* out = codes + r * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] = to_e4m3(value_of(row[c]) / scale[c]);
    }
    // codes [h, cols] -> q[c * rows + r0 + r], in 32 x 32 blocks.
    for (int64_t cb = 0; cb < cols; cb += 32)
      for (int64_t rb = 0; rb < h; rb += 32)
        for (int64_t c = cb; c < std::min(cols, cb + 32); ++c)
          for (int64_t r = rb; r < std::min(h, rb + 32); ++r) q[c * rows + r0 + r] = codes[r * cols + c];
  }
}

// One 128 x 128 block's amax and scale, then its codes, in w's layout or (transposed) in w^T's.
template <typename T>
void blocks_impl(const T* w, int64_t rows, int64_t cols, uint8_t* q, float* scales, bool transposed) {
  const int64_t nr = tiles(rows), nc = tiles(cols);
  for (int64_t br = 0; br < nr; ++br)
    for (int64_t bc = 0; bc < nc; ++bc) {
      const int64_t r0 = br * kFp8Tile, c0 = bc * kFp8Tile;
      const int64_t h = std::min(kFp8Tile, rows - r0), wd = std::min(kFp8Tile, cols - c0);
      uint32_t m = 0;
      for (int64_t r = r0; r < r0 + h; ++r) m = std::max(m, amax_bits(w + r * cols + c0, wd));
      const float s = fp8_scale(float_of(m));
      if (!transposed) {
        scales[br * nc + bc] = s;
        for (int64_t r = r0; r < r0 + h; ++r) encode(w + r * cols + c0, wd, s, q + r * cols + c0);
        continue;
      }
      scales[bc * nr + br] = s;
      for (int64_t c = c0; c < c0 + wd; ++c)
        for (int64_t r = r0; r < r0 + h; ++r) q[c * rows + r] = to_e4m3(value_of(w[r * cols + c]) / s);
    }
}
}  // namespace

void quantize_tiles(const float* x, int64_t rows, int64_t cols, uint8_t* q, float* scales) {
  tiles_impl(x, rows, cols, q, scales);
}
void quantize_tiles(const uint16_t* x, int64_t rows, int64_t cols, uint8_t* q, float* scales) {
  tiles_impl(x, rows, cols, q, scales);
}
int64_t tiles_transposed_work_bytes(int64_t rows, int64_t cols) {
  return 8 * cols + std::min(kFp8Tile, rows) * cols;
}
void quantize_tiles_transposed(const float* x, int64_t rows, int64_t cols, uint8_t* q, float* scales,
                               uint8_t* work) {
  tiles_transposed_impl(x, rows, cols, q, scales, work);
}
void quantize_tiles_transposed(const uint16_t* x, int64_t rows, int64_t cols, uint8_t* q, float* scales,
                               uint8_t* work) {
  tiles_transposed_impl(x, rows, cols, q, scales, work);
}
void quantize_blocks(const float* w, int64_t rows, int64_t cols, uint8_t* q, float* scales) {
  blocks_impl(w, rows, cols, q, scales, false);
}
void quantize_blocks(const uint16_t* w, int64_t rows, int64_t cols, uint8_t* q, float* scales) {
  blocks_impl(w, rows, cols, q, scales, false);
}
void quantize_blocks_transposed(const float* w, int64_t rows, int64_t cols, uint8_t* q, float* scales) {
  blocks_impl(w, rows, cols, q, scales, true);
}
void quantize_blocks_transposed(const uint16_t* w, int64_t rows, int64_t cols, uint8_t* q, float* scales) {
  blocks_impl(w, rows, cols, q, scales, true);
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

float round_e4m3_stochastic(float v, float u) {
  const float a = std::fabs(v);
  if (!(a <= kE4M3Max)) return from_e4m3(to_e4m3(v));
  const float* tab = e4m3_table();
  const uint8_t c = to_e4m3(a);  // nearest, a positive code 0x00..0x7e
  const float q = tab[c];
  if (q == a) return v;
  const float lo = q < a ? q : tab[c - 1], hi = q < a ? tab[c + 1] : q;
  const float r = u * (hi - lo) < a - lo ? hi : lo;
  return std::copysign(r, v);
}

void fp8_round_stochastic(float* x, int64_t rows, int64_t cols, bool blocks, uint64_t key) {
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
  const int64_t nt = tiles(cols);
  std::vector<float> scales(static_cast<size_t>((blocks ? tiles(rows) : rows) * nt));
  if (blocks)
    quantize_blocks(x, rows, cols, codes.data(), scales.data());
  else
    quantize_tiles(x, rows, cols, codes.data(), scales.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float s = scales[static_cast<size_t>((blocks ? r / kFp8Tile : r) * nt + c / kFp8Tile)];
      // splitmix64 of the key and the index; the top 24 bits as u in [0, 1).
      uint64_t h = key + static_cast<uint64_t>(r * cols + c + 1) * 0x9e3779b97f4a7c15ull;
      h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
      h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
      h ^= h >> 31;
      const float u = static_cast<float>(h >> 40) * 0x1p-24f;
      float& v = x[r * cols + c];
      v = round_e4m3_stochastic(v / s, u) * s;
    }
}

}  // namespace dsv3::lowp
