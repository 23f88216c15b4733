// Low-precision number formats: bfloat16 and FP8 E4M3 (the "fn" variant: no infinities, one NaN
// code per sign, largest finite 448), their conversions, and the block scaling of FP8 tensors that
// DeepSeek-V3 trains with (report section 3.3.2: 1x128 tiles for activations and gradients, 128x128
// blocks for weights, one fp32 scale per tile or block).
//
// Rounding is round-to-nearest-even everywhere. bf16 keeps subnormals and overflows to infinity,
// as cvt.rn.bf16.f32 does; E4M3 saturates every finite value beyond 448 (and infinity) to +-448, as
// cvt.rn.satfinite.e4m3x2.f32 does; NaN stays NaN (quiet bf16 NaN, E4M3 code 0x7f with its sign).
#pragma once

#include <cstdint>
#include <cstring>

namespace dsv3::lowp {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- bfloat16 (1 sign, 8 exponent, 7 mantissa bits: the top half of an f32) ----
inline uint16_t to_bf16(float f) {
  const uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float from_bf16(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }
// f rounded to the nearest bf16 value, as an f32.
inline float round_bf16(float f) { return from_bf16(to_bf16(f)); }

void to_bf16(const float* x, uint16_t* out, int64_t n);
void from_bf16(const uint16_t* h, float* out, int64_t n);
// x[i] = round_bf16(x[i]) in place.
void round_bf16(float* x, int64_t n);

// ---- FP8 E4M3 (1 sign, 4 exponent with bias 7, 3 mantissa bits) ----
constexpr float kE4M3Max = 448.0f;
// Branch-free, so that loops over it vectorise: each case is computed and the right one selected.
inline uint8_t to_e4m3(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal: round the 23 mantissa bits to 3, to nearest even; a carry moves into the exponent.
  // (Wraps for NaN and huge values, which the selects below replace.)
  const uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
  const uint32_t normal = (r >> 20) - ((127u - 7u) << 3);
  // Below 2^-6: subnormal steps of 2^-9. |f| * 512 < 8 (exact, a power of two) rounded to the nearest
  // integer, ties to even, by adding 2^23: the integer is then the low mantissa bits of the sum.
  const uint32_t sub = bits_of(float_of(a) * 512.0f + 8388608.0f) - 0x4b000000u;
  // Selects as masks (all ones where the case holds).
  const uint32_t is_sub = 0u - static_cast<uint32_t>(a < 0x3c800000u);
  const uint32_t is_sat = 0u - static_cast<uint32_t>(a >= 0x43e00000u);  // 448 and beyond (infinity too)
  const uint32_t is_nan = 0u - static_cast<uint32_t>(a > 0x7f800000u);
  uint32_t code = (sub & is_sub) | (normal & ~is_sub);
  code = (0x7eu & is_sat) | (code & ~is_sat);  // saturate
  code = (0x7fu & is_nan) | (code & ~is_nan);  // NaN keeps its sign
  return static_cast<uint8_t>(sign | code);
}
float from_e4m3(uint8_t q);  // exact (table lookup)
const float* e4m3_table();   // the 256 decoded values

// ---- FP8 block scaling ----
constexpr int64_t kFp8Tile = 128;
inline int64_t tiles(int64_t n) { return (n + kFp8Tile - 1) / kFp8Tile; }
// The scale of a tile or block with largest magnitude `amax`: amax / 448 (1 for an all-zero tile, so
// zeros stay zeros); its values are stored as to_e4m3(x / scale) and read back as from_e4m3(q) * scale.
inline float fp8_scale(float amax) { return amax > 0.0f ? amax / kE4M3Max : 1.0f; }

// The quantizers read f32 input or bf16 input (bit patterns, as to_bf16 gives them); bf16 input is
// quantized bit for bit as its f32 values would be, without an f32 copy.
//
// x [rows, cols] row-major -> codes q [rows, cols] and scales [rows, tiles(cols)]: one scale per
// 1 x 128 tile along each row (the last tile of a row may be narrower).
void quantize_tiles(const float* x, int64_t rows, int64_t cols, uint8_t* q, float* scales);
void quantize_tiles(const uint16_t* x, int64_t rows, int64_t cols, uint8_t* q, float* scales);
// w [rows, cols] -> codes q [rows, cols] and scales [tiles(rows), tiles(cols)]: one scale per
// 128 x 128 block.
void quantize_blocks(const float* w, int64_t rows, int64_t cols, uint8_t* q, float* scales);
void quantize_blocks(const uint16_t* w, int64_t rows, int64_t cols, uint8_t* q, float* scales);
// w [rows, cols] -> the codes and scales quantize_blocks gives for w's transpose [cols, rows]: w's
// own blocks (same amax, same codes), written transposed: q [cols, rows], scales [tiles(cols),
// tiles(rows)].
void quantize_blocks_transposed(const float* w, int64_t rows, int64_t cols, uint8_t* q, float* scales);
void quantize_blocks_transposed(const uint16_t* w, int64_t rows, int64_t cols, uint8_t* q, float* scales);
// x [rows, cols] -> the codes and scales quantize_tiles gives for x's transpose [cols, rows] (tiles
// along x's rows): q [cols, rows], scales [cols, tiles(rows)], without an f32 transpose. `work`, if
// given, holds tiles_transposed_work_bytes(rows, cols) bytes (4-byte aligned) for the per-tile column
// statistics and codes; otherwise they are allocated for the call.
int64_t tiles_transposed_work_bytes(int64_t rows, int64_t cols);
void quantize_tiles_transposed(const float* x, int64_t rows, int64_t cols, uint8_t* q, float* scales,
                               uint8_t* work = nullptr);
void quantize_tiles_transposed(const uint16_t* x, int64_t rows, int64_t cols, uint8_t* q, float* scales,
                               uint8_t* work = nullptr);
// The inverses: out = from_e4m3(q) * scale of the tile/block.
void dequantize_tiles(const uint8_t* q, const float* scales, int64_t rows, int64_t cols, float* out);
void dequantize_blocks(const uint8_t* q, const float* scales, int64_t rows, int64_t cols, float* out);

// ---- Stochastic rounding to E4M3 (an ablation; the FP8 kernels round to nearest) ----
// v (|v| <= 448) rounded to one of its two neighbours on the E4M3 grid, the upper one with probability
// (v - lower) / (upper - lower) when u is uniform in [0, 1): unbiased, E[result] = v. Values on the
// grid are kept; anything else (NaN, beyond 448) is rounded to nearest.
float round_e4m3_stochastic(float v, float u);
// x [rows, cols] in place: each value replaced by its E4M3 value under the scale quantize_tiles (or
// quantize_blocks) gives it, rounded stochastically with u drawn from a hash of `key` and the
// element's index (the same key and x give the same values).
void fp8_round_stochastic(float* x, int64_t rows, int64_t cols, bool blocks, uint64_t key);

}  // namespace dsv3::lowp
