// Naive scalar references of the dense ops of kernels/ops.hpp (linear, element-wise, column copies,
// embedding and its vocabulary shard, RMSNorm, RoPE with YaRN, causal attention, MLA key/value
// assembly, SwiGLU). Written for clarity, not speed: plain loops straight from the formulas,
// templated on the scalar type so the op registry runs them in double. Arrays are contiguous
// row-major, shapes as in ops.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "ops.hpp"

namespace dsv3::ref {

// y[M, N] = (accumulate ? y : 0) + x[M, K] . w[N, K]^T
template <typename Real>
void linear(const Real* x, const Real* w, Real* y, int64_t M, int64_t N, int64_t K, bool accumulate = false) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      Real acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += x[m * K + k] * w[n * K + k];
      y[m * N + n] = (accumulate ? y[m * N + n] : Real(0)) + acc;
    }
}

// dst[T, n] = src[T, col0 : col0 + n], src [T, C]
template <typename Real>
void copy_columns(const Real* src, int64_t T, int64_t C, int64_t col0, int64_t n, Real* dst) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < n; ++j) dst[t * n + j] = src[t * C + col0 + j];
}

// out[t, :] = table[ids[t], :], table [V, D]; ids assumed valid.
template <typename Real>
void embedding(const int32_t* ids, int64_t T, const Real* table, int64_t D, Real* out) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < D; ++j) out[t * D + j] = table[static_cast<int64_t>(ids[t]) * D + j];
}

// Vocabulary shard of the embedding: table [Vs, D] holds rows [first, first + Vs) of the full table;
// out[t, :] = table[ids[t] - first, :] for ids inside the shard, 0 otherwise.
template <typename Real>
void embedding_shard(const int32_t* ids, int64_t T, const Real* table, int64_t first, int64_t Vs, int64_t D,
                     Real* out) {
  for (int64_t t = 0; t < T; ++t) {
    const bool inside = ids[t] >= first && ids[t] < first + Vs;
    for (int64_t j = 0; j < D; ++j)
      out[t * D + j] = inside ? table[(static_cast<int64_t>(ids[t]) - first) * D + j] : Real(0);
  }
}

// y = x / sqrt(mean(x^2) + eps) * w over rows of x [T, D]; rstd [T].
template <typename Real>
void rmsnorm(const Real* x, const Real* w, Real eps, int64_t T, int64_t D, Real* y, Real* rstd) {
  for (int64_t t = 0; t < T; ++t) {
    Real ss = 0;
    for (int64_t j = 0; j < D; ++j) ss += x[t * D + j] * x[t * D + j];
    const Real r = Real(1) / std::sqrt(ss / Real(D) + eps);
    rstd[t] = r;
    for (int64_t j = 0; j < D; ++j) y[t * D + j] = x[t * D + j] * r * w[j];
  }
}

// RoPE frequencies f_i, i < R/2, with the YaRN blend (DeepSeek-V3 inference semantics), in double.
inline std::vector<double> rope_frequencies(const ops::RopeParams& p) {
  const int64_t R = p.rope_dim;
  std::vector<double> f;
  for (int64_t i = 0; i < R / 2; ++i) f.push_back(1.0 / std::pow(p.theta, double(2 * i) / double(R)));
  if (p.yarn) {
    const double pi = std::acos(-1.0);
    auto corr_dim = [&](double rotations) {
      return double(R) * std::log(double(p.original_context_length) / (rotations * 2 * pi)) /
             (2 * std::log(p.theta));
    };
    double low = std::floor(corr_dim(p.beta_fast));
    double high = std::ceil(corr_dim(p.beta_slow));
    if (low < 0) low = 0;
    if (high > double(R - 1)) high = double(R - 1);
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < R / 2; ++i) {
      double ramp = (double(i) - low) / (high - low);
      if (ramp < 0) ramp = 0;
      if (ramp > 1) ramp = 1;
      const double smooth = 1 - ramp;
      f[i] = f[i] / p.factor * (1 - smooth) + f[i] * smooth;
    }
  }
  return f;
}

// cos, sin [P, R/2]: angle = pos * f_i.
template <typename Real>
void rope_table(const ops::RopeParams& p, int64_t P, Real* cos, Real* sin) {
  const std::vector<double> f = rope_frequencies(p);
  const int64_t half = p.rope_dim / 2;
  for (int64_t pos = 0; pos < P; ++pos)
    for (int64_t i = 0; i < half; ++i) {
      cos[pos * half + i] = Real(std::cos(double(pos) * f[i]));
      sin[pos * half + i] = Real(std::sin(double(pos) * f[i]));
    }
}

// In place on x [B, S, H, Dh]: pairs (offset + 2i, offset + 2i + 1) of every head rotated by the angle
// of position s; cos, sin [>= S, half].
template <typename Real>
void rope(Real* x, int64_t B, int64_t S, int64_t H, int64_t Dh, const Real* cos, const Real* sin,
          int64_t half, int64_t offset) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < half; ++i) {
          Real* pair = x + ((b * S + s) * H + h) * Dh + offset + 2 * i;
          const Real a = pair[0], c = cos[s * half + i], sn = sin[s * half + i];
          const Real bb = pair[1];
          pair[0] = a * c - bb * sn;
          pair[1] = a * sn + bb * c;
        }
}

// Causal softmax attention per (batch, head): q, k [B, S, H, Dqk], v [B, S, H, Dv] -> o [B, S, H, Dv],
// lse [B, H, S].
template <typename Real>
void attention(const Real* q, const Real* k, const Real* v, int64_t B, int64_t S, int64_t H, int64_t Dqk,
               int64_t Dv, Real scale, Real* o, Real* lse) {
  std::vector<Real> score(static_cast<size_t>(S));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const Real* qr = q + ((b * S + s) * H + h) * Dqk;
        Real mx = -std::numeric_limits<Real>::infinity();
        for (int64_t j = 0; j <= s; ++j) {
          const Real* kr = k + ((b * S + j) * H + h) * Dqk;
          Real dot = 0;
          for (int64_t e = 0; e < Dqk; ++e) dot += qr[e] * kr[e];
          score[j] = dot * scale;
          mx = std::max(mx, score[j]);
        }
        Real sum = 0;
        for (int64_t j = 0; j <= s; ++j) sum += std::exp(score[j] - mx);
        Real* orow = o + ((b * S + s) * H + h) * Dv;
        for (int64_t e = 0; e < Dv; ++e) orow[e] = 0;
        for (int64_t j = 0; j <= s; ++j) {
          const Real p = std::exp(score[j] - mx) / sum;
          const Real* vr = v + ((b * S + j) * H + h) * Dv;
          for (int64_t e = 0; e < Dv; ++e) orow[e] += p * vr[e];
        }
        lse[(b * H + h) * S + s] = mx + std::log(sum);
      }
}

// kv [B, S, H, nope + dv], k_pe [B, S, R] -> k [B, S, H, nope + R], v [B, S, H, dv].
template <typename Real>
void mla_assemble_kv(const Real* kv, const Real* k_pe, int64_t B, int64_t S, int64_t H, int64_t nope,
                     int64_t R, int64_t dv, Real* k, Real* v) {
  for (int64_t t = 0; t < B * S; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const Real* src = kv + (t * H + h) * (nope + dv);
      for (int64_t j = 0; j < nope; ++j) k[(t * H + h) * (nope + R) + j] = src[j];
      for (int64_t j = 0; j < R; ++j) k[(t * H + h) * (nope + R) + nope + j] = k_pe[t * R + j];
      for (int64_t j = 0; j < dv; ++j) v[(t * H + h) * dv + j] = src[nope + j];
    }
}

// h = silu(g) * u element-wise.
template <typename Real>
void swiglu(const Real* g, const Real* u, int64_t n, Real* h) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] / (Real(1) + std::exp(-g[i])) * u[i];
}

}  // namespace dsv3::ref
