// Float helpers for the host kernels' inner loops: exp_f32 (Cephes-style range reduction and a
// degree-6 polynomial, relative error below 1e-7 for finite inputs, 0 below the float range), its
// SSE4.1 array forms (bit-identical to the scalar one, so results do not depend on alignment or
// length) and fixed-order lane sums that vectorise without -ffast-math.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__SSE4_1__)
#include <smmintrin.h>
#endif

namespace dsv3::host {

// exp(x) for finite x (x -> -inf gives 0, large x saturates at exp(88)). Pure arithmetic and bit
// masks, no branches, so loops over it vectorise without -ffast-math.
inline float exp_f32(float x) {
  const float lo = -87.33654f, hi = 88.0f;
  const int32_t keep = -static_cast<int32_t>(x >= lo);  // all ones unless the result underflows
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (|x / ln 2| < 2^22), r = x - n ln 2 in two parts.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n, or 0 on underflow. A NaN input gives a NaN polynomial; its exponent is irrelevant, but the
  // float -> int conversion of NaN is undefined, so it is taken from 0.
  const float n_finite = n == n ? n : 0.0f;
  const uint32_t bits =
      (static_cast<uint32_t>(static_cast<int32_t>(n_finite) + 127) << 23) & static_cast<uint32_t>(keep);
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Sum of n floats in double, accumulated in 8 interleaved lanes combined in a fixed order
// (deterministic; vectorisable unlike one sequential chain).
inline double lane_sum_f64(const float* x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(x[i + j]);
  for (; i < n; ++i) acc[i & 7] += static_cast<double>(x[i]);
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// Same for a float accumulation.
inline float lane_sum_f32(const float* x, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j];
  for (; i < n; ++i) acc[i & 7] += x[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// Maximum of n >= 1 floats (NaN-free inputs).
inline float lane_max_f32(const float* x, int64_t n) {
  float acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = x[0];
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] = acc[j] > x[i + j] ? acc[j] : x[i + j];
  for (; i < n; ++i) acc[i & 7] = acc[i & 7] > x[i] ? acc[i & 7] : x[i];
  float m = acc[0];
  for (int j = 1; j < 8; ++j) m = m > acc[j] ? m : acc[j];
  return m;
}

#if defined(__SSE4_1__)
// Four lanes of exp_f32(x), the same operations in the same order.
inline __m128 exp_f32x4(__m128 x) {
  const __m128 lo = _mm_set1_ps(-87.33654f), hi = _mm_set1_ps(88.0f);
  const __m128i keep = _mm_castps_si128(_mm_cmpge_ps(x, lo));
  x = _mm_min_ps(_mm_max_ps(x, lo), hi);
  const __m128 magic = _mm_set1_ps(12582912.0f);
  const __m128 n = _mm_sub_ps(_mm_add_ps(_mm_mul_ps(x, _mm_set1_ps(1.44269504088896341f)), magic), magic);
  __m128 r = _mm_sub_ps(x, _mm_mul_ps(n, _mm_set1_ps(0.693359375f)));
  r = _mm_add_ps(r, _mm_mul_ps(n, _mm_set1_ps(2.12194440e-4f)));
  __m128 p = _mm_set1_ps(1.9875691500e-4f);
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.3981999507e-3f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(8.3334519073e-3f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(4.1665795894e-2f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.6666665459e-1f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(5.0000001201e-1f));
  p = _mm_add_ps(_mm_add_ps(_mm_mul_ps(_mm_mul_ps(p, r), r), r), _mm_set1_ps(1.0f));
  const __m128i e = _mm_slli_epi32(_mm_add_epi32(_mm_cvttps_epi32(n), _mm_set1_epi32(127)), 23);
  return _mm_mul_ps(p, _mm_castsi128_ps(_mm_and_si128(e, keep)));
}
#endif

// x[i] = exp_f32(x[i] - shift) for i < n.
inline void exp_shifted_inplace(float* x, int64_t n, float shift) {
  int64_t i = 0;
#if defined(__SSE4_1__)
  const __m128 s = _mm_set1_ps(shift);
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(x + i, exp_f32x4(_mm_sub_ps(_mm_loadu_ps(x + i), s)));
#endif
  for (; i < n; ++i) x[i] = exp_f32(x[i] - shift);
}

// sum_i exp_f32(x[i] - shift) in double, in a fixed order (x is not modified).
inline double exp_shifted_sum_f64(const float* x, int64_t n, float shift) {
  float buf[256];
  double total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += 256) {
    const int64_t m = n - i0 < 256 ? n - i0 : 256;
    std::memcpy(buf, x + i0, static_cast<size_t>(m) * sizeof(float));
    exp_shifted_inplace(buf, m, shift);
    total += lane_sum_f64(buf, m);
  }
  return total;
}

}  // namespace dsv3::host
