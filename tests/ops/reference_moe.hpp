// Naive scalar references of the MoE and loss ops (router, dispatch plan, dispatch, combine,
// cross-entropy and its vocabulary shard, sequence-wise balance loss), written for clarity rather
// than speed and templated on the scalar type so the op registry runs them in double. They follow
// kernels/ops.hpp and src/model/MODEL.md literally (sorting where the backend scans, per-expert
// passes where the backend counts), so that backend and reference share no code.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "ops.hpp"

namespace dsv3::optest::ref {

// logits [T, E]; bias [E] (read only if p.use_bias) -> scores [T, E], idx [T, K], weights [T, K].
template <typename Real>
void router(const ops::RouterParams& p, int64_t T, const std::vector<Real>& logits,
            const std::vector<Real>& bias, std::vector<Real>& scores, std::vector<int32_t>& idx,
            std::vector<Real>& weights) {
  const int64_t E = p.num_experts, K = p.top_k, G = p.num_groups, n = E / G;
  scores.assign(static_cast<size_t>(T * E), Real(0));
  idx.assign(static_cast<size_t>(T * K), 0);
  weights.assign(static_cast<size_t>(T * K), Real(0));
  for (int64_t t = 0; t < T; ++t) {
    // scores = sigmoid(logits) or softmax(logits)
    std::vector<Real> s(static_cast<size_t>(E));
    if (p.sigmoid) {
      for (int64_t e = 0; e < E; ++e) s[e] = Real(1) / (Real(1) + std::exp(-logits[t * E + e]));
    } else {
      Real m = logits[t * E];
      for (int64_t e = 0; e < E; ++e) m = std::max(m, logits[t * E + e]);
      Real z = 0;
      for (int64_t e = 0; e < E; ++e) z += std::exp(logits[t * E + e] - m);
      for (int64_t e = 0; e < E; ++e) s[e] = std::exp(logits[t * E + e] - m) / z;
    }
    for (int64_t e = 0; e < E; ++e) scores[t * E + e] = s[e];

    // selection scores
    std::vector<Real> sel = s;
    if (p.use_bias)
      for (int64_t e = 0; e < E; ++e) sel[e] += bias[e];

    // group limit: group score = sum of the top-2 (bias) or the max (no bias); keep the best groups
    if (G > 1) {
      std::vector<Real> gscore(static_cast<size_t>(G));
      for (int64_t g = 0; g < G; ++g) {
        std::vector<Real> v(sel.begin() + g * n, sel.begin() + (g + 1) * n);
        std::sort(v.begin(), v.end(), [](Real a, Real b) { return a > b; });
        gscore[g] = (p.use_bias && n > 1) ? v[0] + v[1] : v[0];
      }
      std::vector<int64_t> order(static_cast<size_t>(G));
      std::iota(order.begin(), order.end(), int64_t{0});
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return gscore[a] > gscore[b]; });
      for (int64_t r = p.topk_groups; r < G; ++r)
        for (int64_t j = 0; j < n; ++j) sel[order[r] * n + j] = -std::numeric_limits<Real>::infinity();
    }

    // top-k, descending, ties to the lower id (a stable sort of the ids by selection score)
    std::vector<int64_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sel[a] > sel[b]; });
    Real sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += s[order[k]];
    for (int64_t k = 0; k < K; ++k) {
      idx[t * K + k] = static_cast<int32_t>(order[k]);
      Real w = s[order[k]];
      if (p.norm_topk) w /= sum;
      weights[t * K + k] = w * Real(p.route_scale);
    }
  }
}

struct Plan {
  std::vector<int32_t> offsets, slot_of_row, row_of_slot;
  int64_t rows = 0, dropped = 0;
};

// idx [T, K] -> the expert-sorted slot layout of make_dispatch_plan (one pass over the slots per expert).
inline Plan dispatch_plan(const std::vector<int32_t>& idx, int64_t T, int64_t K, int64_t E,
                          int64_t capacity) {
  Plan p;
  p.row_of_slot.assign(static_cast<size_t>(T * K), -1);
  p.offsets.push_back(0);
  for (int64_t e = 0; e < E; ++e) {
    int64_t taken = 0;
    for (int64_t slot = 0; slot < T * K; ++slot) {
      if (idx[slot] != e) continue;
      if (capacity > 0 && taken >= capacity) {
        ++p.dropped;
        continue;
      }
      p.row_of_slot[slot] = static_cast<int32_t>(p.slot_of_row.size());
      p.slot_of_row.push_back(static_cast<int32_t>(slot));
      ++taken;
    }
    p.offsets.push_back(static_cast<int32_t>(p.slot_of_row.size()));
  }
  p.rows = static_cast<int64_t>(p.slot_of_row.size());
  return p;
}

// x [T, D] -> xs [R, D]
template <typename Real>
std::vector<Real> dispatch(const Plan& plan, int64_t K, int64_t D, const std::vector<Real>& x) {
  std::vector<Real> xs(static_cast<size_t>(plan.rows * D));
  for (int64_t r = 0; r < plan.rows; ++r) {
    const int64_t t = plan.slot_of_row[r] / K;
    for (int64_t d = 0; d < D; ++d) xs[r * D + d] = x[t * D + d];
  }
  return xs;
}

// ys [R, D], weights [T, K] -> y [T, D]
template <typename Real>
std::vector<Real> combine(const Plan& plan, int64_t T, int64_t K, int64_t D, const std::vector<Real>& ys,
                          const std::vector<Real>& weights) {
  std::vector<Real> y(static_cast<size_t>(T * D), Real(0));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const int32_t r = plan.row_of_slot[t * K + k];
      if (r < 0) continue;
      for (int64_t d = 0; d < D; ++d) y[t * D + d] += weights[t * K + k] * ys[r * D + d];
    }
  return y;
}

// log(sum_v exp(l[v])) of one row of n logits, shifted by the row maximum.
template <typename Real>
Real row_lse(const Real* l, int64_t n) {
  const Real m = *std::max_element(l, l + n);
  Real z = 0;
  for (int64_t v = 0; v < n; ++v) z += std::exp(l[v] - m);
  return m + std::log(z);
}

// logits [C, V], targets [C] -> losses [C], lse [C]
template <typename Real>
void cross_entropy(int64_t C, int64_t V, const std::vector<Real>& logits, const std::vector<int32_t>& targets,
                   std::vector<Real>& losses, std::vector<Real>& lse) {
  losses.assign(static_cast<size_t>(C), Real(0));
  lse.assign(static_cast<size_t>(C), Real(0));
  for (int64_t c = 0; c < C; ++c) {
    const Real* l = logits.data() + c * V;
    lse[c] = row_lse(l, V);
    losses[c] = targets[c] < 0 ? Real(0) : lse[c] - l[targets[c]];
  }
}

// Vocabulary shard: logits [C, Vs] are columns [first, first + Vs) of the full logits. Per row the
// shard's log-sum-exp and the target logit (0 when the target is outside the shard or ignored).
template <typename Real>
void cross_entropy_shard(int64_t C, int64_t Vs, int64_t first, const std::vector<Real>& logits,
                         const std::vector<int32_t>& targets, std::vector<Real>& shard_lse,
                         std::vector<Real>& target_logit) {
  shard_lse.assign(static_cast<size_t>(C), Real(0));
  target_logit.assign(static_cast<size_t>(C), Real(0));
  for (int64_t c = 0; c < C; ++c) {
    const Real* l = logits.data() + c * Vs;
    shard_lse[c] = row_lse(l, Vs);
    const int64_t j = static_cast<int64_t>(targets[c]) - first;
    if (targets[c] >= 0 && j >= 0 && j < Vs) target_logit[c] = l[j];
  }
}

// The shard backward written out: dlogits[c, v] = dloss[c] * (exp(logits[c, v] - lse[c]) - [v is the
// target]) with lse the full-vocabulary log-sum-exp; ignored rows 0.
template <typename Real>
std::vector<Real> cross_entropy_shard_backward(int64_t C, int64_t Vs, int64_t first,
                                               const std::vector<Real>& logits,
                                               const std::vector<int32_t>& targets,
                                               const std::vector<Real>& lse, const std::vector<Real>& dloss) {
  std::vector<Real> d(static_cast<size_t>(C * Vs), Real(0));
  for (int64_t c = 0; c < C; ++c) {
    if (targets[c] < 0) continue;
    for (int64_t v = 0; v < Vs; ++v) {
      const Real onehot = static_cast<int64_t>(targets[c]) - first == v ? Real(1) : Real(0);
      d[c * Vs + v] = dloss[c] * (std::exp(logits[c * Vs + v] - lse[c]) - onehot);
    }
  }
  return d;
}

// scores [B*S, E], idx [B*S, K] -> alpha * mean_b sum_i f_i P_i
template <typename Real>
Real seq_balance_loss(int64_t B, int64_t S, int64_t E, int64_t K, double alpha,
                      const std::vector<Real>& scores, const std::vector<int32_t>& idx) {
  Real total = 0;
  for (int64_t b = 0; b < B; ++b) {
    Real seq = 0;
    for (int64_t i = 0; i < E; ++i) {
      Real P = 0;
      int64_t chosen = 0;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t t = b * S + s;
        Real z = 0;
        for (int64_t j = 0; j < E; ++j) z += scores[t * E + j];
        P += scores[t * E + i] / z;
        bool has = false;
        for (int64_t k = 0; k < K; ++k) has = has || idx[t * K + k] == i;
        chosen += has ? 1 : 0;
      }
      P /= Real(S);
      const Real f = Real(E) / Real(K * S) * Real(chosen);
      seq += f * P;
    }
    total += Real(alpha) * seq;
  }
  return total / Real(B);
}

}  // namespace dsv3::optest::ref
