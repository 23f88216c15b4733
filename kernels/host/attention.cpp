// Causal attention, flash style (kernels/ops.hpp): attention_forward and attention_backward.
//   q, k, dq, dk [B, S, H, Dqk]; v, o, d_o, dv [B, S, H, Dv]; lse [B, H, S]
// Queries and keys are processed in tiles of kTile rows. The forward keeps a running max and sum per
// query row (online softmax) and saves lse = log-sum-exp of the scaled scores; the backward
// recomputes the probabilities of each (query tile, key tile) pair from lse. Scores, probabilities
// and their gradients live in one kTile x kTile scratch tile; the only extra memory proportional to
// the sequence is lse and the row sums D[s] = <d_o[s], o[s]> of the backward ([S] per head).
// Tile products go through CBLAS sgemm directly on the strided [B, S, H, D] layout (row stride H*D).
// GPU tensors go to the CUDA twin, kernels/cuda/attention.cu.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.hpp"
#include "host/fast_math.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

constexpr int64_t kTile = 64;  // query and key tile size (rows)

// C[m, n] = alpha * op(A) . op(B) + beta * C, row-major; m, n, k >= 1.
void sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda),
              b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

struct Dims {
  int64_t B, S, H, Dqk, Dv;
};

// Checks q, k [B, S, H, Dqk], v, o [B, S, H, Dv], lse [B, H, S] and returns the extents.
Dims check_attention(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                     const Tensor& lse, float scale) {
  for (const Tensor* t : {&q, &k, &v, &o, &lse}) host::check_f32_backend(op, *t);
  DSV3_CHECK(q.ndim() == 4, op, ": tensor '", q.name(), "' has shape ", q.shape_str(),
             ", expected [B, S, H, Dqk]");
  DSV3_CHECK(v.ndim() == 4, op, ": tensor '", v.name(), "' has shape ", v.shape_str(),
             ", expected [B, S, H, Dv]");
  Dims d{q.dim(0), q.dim(1), q.dim(2), q.dim(3), v.dim(3)};
  expect_shape(op, k, {d.B, d.S, d.H, d.Dqk});
  expect_shape(op, v, {d.B, d.S, d.H, d.Dv});
  expect_shape(op, o, {d.B, d.S, d.H, d.Dv});
  expect_shape(op, lse, {d.B, d.H, d.S});
  DSV3_CHECK(d.Dqk > 0 && d.Dv > 0, op, ": head dims must be > 0 (tensors '", q.name(), "' ", q.shape_str(),
             ", '", v.name(), "' ", v.shape_str(), ")");
  DSV3_CHECK(d.H * std::max(d.Dqk, d.Dv) <= 0x7fffffff, op, ": row stride too large for CBLAS");
  DSV3_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  return d;
}

}  // namespace

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& o,
                       const Tensor& lse) {
  DSV3_PROFILE(Attention);
  const Dims d = check_attention("attention_forward", q, k, v, o, lse, scale);
  if constexpr (host::kCuda)
    if (host::on_cuda("attention_forward", {&q, &k, &v, &o, &lse}))
      return cuda::attention_forward(q, k, v, scale, o, lse);
  const int64_t B = d.B, S = d.S, H = d.H, Dqk = d.Dqk, Dv = d.Dv;
  const int64_t ldq = H * Dqk, ldv = H * Dv, ntiles = (S + kTile - 1) / kTile;
  const float* pq = q.f32();
  const float* pk = k.f32();
  const float* pv = v.f32();
  float* po = o.f32();
  float* plse = lse.f32();
  // One iteration per (batch, head, query tile).
  host::parallel_for("dsv3::attention_forward", B * H * ntiles, [=](int64_t job) {
    const int64_t qt = job % ntiles, bh = job / ntiles, h = bh % H, b = bh / H;
    const int64_t i0 = qt * kTile, i1 = std::min(S, i0 + kTile), nq = i1 - i0;
    std::vector<float> scores(static_cast<size_t>(kTile * kTile)), acc(static_cast<size_t>(nq * Dv), 0.0f);
    std::vector<float> mrow(static_cast<size_t>(nq), -std::numeric_limits<float>::infinity());
    std::vector<float> lrow(static_cast<size_t>(nq), 0.0f);
    float* sc = scores.data();
    const float* qp = pq + ((b * S + i0) * H + h) * Dqk;
    for (int64_t j0 = 0; j0 < i1; j0 += kTile) {
      const int64_t j1 = std::min(i1, j0 + kTile), nk = j1 - j0;
      const float* kp = pk + ((b * S + j0) * H + h) * Dqk;
      const float* vp = pv + ((b * S + j0) * H + h) * Dv;
      sgemm(false, true, nq, nk, Dqk, scale, qp, ldq, kp, ldq, 0.0f, sc, nk);  // [nq, nk]
      for (int64_t r = 0; r < nq; ++r) {
        float* row = sc + r * nk;
        const int64_t valid = std::min(nk, i0 + r - j0 + 1);  // keys j0 .. i0 + r (>= 1 since j0 <= i0)
        const float mx = host::lane_max_f32(row, valid);
        const float m_new = std::max(mrow[r], mx);
        const float rescale = std::exp(mrow[r] - m_new);  // 0 on the first tile (m = -inf)
        host::exp_shifted_inplace(row, valid, m_new);
        const float sum = host::lane_sum_f32(row, valid);
        for (int64_t c = valid; c < nk; ++c) row[c] = 0.0f;
        lrow[r] = lrow[r] * rescale + sum;
        mrow[r] = m_new;
        if (rescale != 1.0f) {
          float* ar = acc.data() + r * Dv;
          for (int64_t e = 0; e < Dv; ++e) ar[e] *= rescale;
        }
      }
      sgemm(false, false, nq, Dv, nk, 1.0f, sc, nk, vp, ldv, 1.0f, acc.data(), Dv);  // acc += P . V
    }
    for (int64_t r = 0; r < nq; ++r) {
      const float inv = 1.0f / lrow[r];
      float* orow = po + ((b * S + i0 + r) * H + h) * Dv;
      const float* ar = acc.data() + r * Dv;
      for (int64_t e = 0; e < Dv; ++e) orow[e] = ar[e] * inv;
      plse[bh * S + i0 + r] = mrow[r] + std::log(lrow[r]);
    }
  });
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                        const Tensor& d_o, float scale, const Tensor& dq, const Tensor& dk,
                        const Tensor& dv) {
  DSV3_PROFILE(Attention);
  const char* op = "attention_backward";
  const Dims d = check_attention(op, q, k, v, o, lse, scale);
  for (const Tensor* t : {&d_o, &dq, &dk, &dv}) host::check_f32_backend(op, *t);
  const int64_t B = d.B, S = d.S, H = d.H, Dqk = d.Dqk, Dv = d.Dv;
  expect_shape(op, d_o, {B, S, H, Dv});
  expect_shape(op, dq, {B, S, H, Dqk});
  expect_shape(op, dk, {B, S, H, Dqk});
  expect_shape(op, dv, {B, S, H, Dv});
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&q, &k, &v, &o, &lse, &d_o, &dq, &dk, &dv}))
      return cuda::attention_backward(q, k, v, o, lse, d_o, scale, dq, dk, dv);
  const int64_t ldq = H * Dqk, ldv = H * Dv;
  const float* pq = q.f32();
  const float* pk = k.f32();
  const float* pv = v.f32();
  const float* po = o.f32();
  const float* pdo = d_o.f32();
  const float* plse = lse.f32();
  float* pdq = dq.f32();
  float* pdk = dk.f32();
  float* pdv = dv.f32();
  // The gradients are accumulated tile by tile below; start from zero.
  host::parallel_for("dsv3::attention_backward_zero", B * S * H, [=](int64_t row) {
    for (int64_t e = 0; e < Dqk; ++e) pdq[row * Dqk + e] = 0.0f, pdk[row * Dqk + e] = 0.0f;
    for (int64_t e = 0; e < Dv; ++e) pdv[row * Dv + e] = 0.0f;
  });
  // One iteration per (batch, head): key tiles outer (dk, dv of the tile accumulate), query tiles
  // inner (dq rows accumulate over key tiles; the iteration owns its head's rows of dq, dk, dv).
  host::parallel_for("dsv3::attention_backward", B * H, [=](int64_t bh) {
    const int64_t h = bh % H, b = bh / H;
    std::vector<float> p_tile(static_cast<size_t>(kTile * kTile)),
        ds_tile(static_cast<size_t>(kTile * kTile));
    std::vector<float> dsum(static_cast<size_t>(S));  // D[s] = <d_o[s], o[s]>
    for (int64_t s = 0; s < S; ++s) {
      const float* orow = po + ((b * S + s) * H + h) * Dv;
      const float* grow = pdo + ((b * S + s) * H + h) * Dv;
      float acc = 0.0f;
      for (int64_t e = 0; e < Dv; ++e) acc += orow[e] * grow[e];
      dsum[static_cast<size_t>(s)] = acc;
    }
    const float* lse_row = plse + bh * S;
    float* pt = p_tile.data();
    float* dst = ds_tile.data();
    for (int64_t j0 = 0; j0 < S; j0 += kTile) {
      const int64_t j1 = std::min(S, j0 + kTile), nk = j1 - j0;
      const float* kp = pk + ((b * S + j0) * H + h) * Dqk;
      const float* vp = pv + ((b * S + j0) * H + h) * Dv;
      float* dkp = pdk + ((b * S + j0) * H + h) * Dqk;
      float* dvp = pdv + ((b * S + j0) * H + h) * Dv;
      for (int64_t i0 = j0; i0 < S; i0 += kTile) {  // query tiles that see this key tile
        const int64_t i1 = std::min(S, i0 + kTile), nq = i1 - i0;
        const float* qp = pq + ((b * S + i0) * H + h) * Dqk;
        const float* gp = pdo + ((b * S + i0) * H + h) * Dv;
        float* dqp = pdq + ((b * S + i0) * H + h) * Dqk;
        sgemm(false, true, nq, nk, Dqk, scale, qp, ldq, kp, ldq, 0.0f, pt, nk);  // scores [nq, nk]
        for (int64_t r = 0; r < nq; ++r) {
          float* row = pt + r * nk;
          const int64_t valid = std::min(nk, i0 + r - j0 + 1);
          const float l = lse_row[i0 + r];
          host::exp_shifted_inplace(row, valid, l);
          for (int64_t c = valid; c < nk; ++c) row[c] = 0.0f;
        }
        sgemm(true, false, nk, Dv, nq, 1.0f, pt, nk, gp, ldv, 1.0f, dvp, ldv);  // dv += P^T . d_o
        sgemm(false, true, nq, nk, Dv, 1.0f, gp, ldv, vp, ldv, 0.0f, dst, nk);  // dP = d_o . V^T
        for (int64_t r = 0; r < nq; ++r) {
          const float di = dsum[static_cast<size_t>(i0 + r)];
          const float* prow = pt + r * nk;
          float* drow = dst + r * nk;
          for (int64_t c = 0; c < nk; ++c) drow[c] = prow[c] * (drow[c] - di);  // dS (unscaled)
        }
        sgemm(false, false, nq, Dqk, nk, scale, dst, nk, kp, ldq, 1.0f, dqp, ldq);  // dq += scale dS . K
        sgemm(true, false, nk, Dqk, nq, scale, dst, nk, qp, ldq, 1.0f, dkp, ldq);   // dk += scale dS^T . Q
      }
    }
  });
}

}  // namespace dsv3::ops
