// Host MoE router (DeepSeek-V3 gate): scores, group-limited top-k selection on the biased scores,
// routing weights from the unbiased scores, and the backward from the weights (and optionally from
// the scores) into the logits. One token per parallel iteration. GPU tensors go to the CUDA twin,
// kernels/cuda/router.cu.
//   logits, scores [T, E]; bias [E]; idx [T, K] i32; weights [T, K]; dweights [T, K]; dscores [T, E]
#include <cmath>
#include <vector>

#include "core/error.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

void check_params(const char* op, const RouterParams& p) {
  DSV3_CHECK(p.num_experts > 0, op, ": num_experts must be positive, got ", p.num_experts);
  DSV3_CHECK(p.top_k > 0 && p.top_k <= p.num_experts, op, ": top_k ", p.top_k,
             " must be in [1, num_experts = ", p.num_experts, "]");
  DSV3_CHECK(p.num_groups > 0 && p.num_experts % p.num_groups == 0, op, ": num_groups ", p.num_groups,
             " must be positive and divide num_experts ", p.num_experts);
  DSV3_CHECK(p.topk_groups > 0 && p.topk_groups <= p.num_groups, op, ": topk_groups ", p.topk_groups,
             " must be in [1, num_groups = ", p.num_groups, "]");
  const int64_t reachable = p.num_groups > 1 ? p.topk_groups * (p.num_experts / p.num_groups) : p.num_experts;
  DSV3_CHECK(p.top_k <= reachable, op, ": top_k ", p.top_k, " exceeds the ", reachable,
             " experts inside the kept groups");
}

}  // namespace

void router_forward(const RouterParams& p, const Tensor& logits, const Tensor& bias, const Tensor& scores,
                    const Tensor& idx, const Tensor& weights) {
  DSV3_PROFILE(MoeRouting);
  const char* op = "router_forward";
  check_params(op, p);
  const int64_t E = p.num_experts, K = p.top_k, G = p.num_groups;
  expect_dtype(op, logits, DType::F32);
  expect_shape(op, logits, {-1, E});
  const int64_t T = logits.dim(0);
  expect_dtype(op, scores, DType::F32);
  expect_shape(op, scores, {T, E});
  expect_dtype(op, idx, DType::I32);
  expect_shape(op, idx, {T, K});
  expect_dtype(op, weights, DType::F32);
  expect_shape(op, weights, {T, K});
  for (const Tensor* t : {&logits, &scores, &idx, &weights}) host::check_backend(op, *t);
  const float* b = nullptr;
  if (p.use_bias) {
    DSV3_CHECK(!bias.empty(), op, ": use_bias is set but tensor 'bias' is empty");
    expect_dtype(op, bias, DType::F32);
    expect_shape(op, bias, {E});
    host::check_backend(op, bias);
    b = bias.f32();
  }
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&logits, &scores, &idx, &weights, p.use_bias ? &bias : &logits}))
      return cuda::router_forward(p, logits, bias, scores, idx, weights);

  const float* L = logits.f32();
  float* S = scores.f32();
  int32_t* I = idx.i32();
  float* W = weights.f32();
  const int64_t per_group = E / G;
  // Per-token scratch: selection scores [T, E], exclusion flags [T, E], group scores and flags [T, G].
  std::vector<float> sel_buf(static_cast<size_t>(T * E)), gscore_buf(static_cast<size_t>(T * G));
  std::vector<unsigned char> excluded_buf(static_cast<size_t>(T * E)), gkept_buf(static_cast<size_t>(T * G));
  float* sel = sel_buf.data();
  float* gscore = gscore_buf.data();
  unsigned char* excluded = excluded_buf.data();
  unsigned char* gkept = gkept_buf.data();

  host::parallel_for("dsv3::router_forward", T, [=](int64_t t) {
    const float* l = L + t * E;
    float* s = S + t * E;
    float* se = sel + t * E;
    unsigned char* ex = excluded + t * E;

    // Scores.
    if (p.sigmoid) {
      for (int64_t e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + std::exp(-l[e]));
    } else {
      float m = l[0];
      for (int64_t e = 1; e < E; ++e) m = std::fmax(m, l[e]);
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) {
        s[e] = std::exp(l[e] - m);
        sum += s[e];
      }
      for (int64_t e = 0; e < E; ++e) s[e] = static_cast<float>(s[e] / sum);
    }
    for (int64_t e = 0; e < E; ++e) {
      se[e] = b ? s[e] + b[e] : s[e];
      ex[e] = 0;
    }

    // Group-limited selection: keep the topk_groups best groups, exclude the experts of the others.
    if (G > 1) {
      float* gs = gscore + t * G;
      unsigned char* gk = gkept + t * G;
      for (int64_t g = 0; g < G; ++g) {
        const float* v = se + g * per_group;
        int64_t first = 0, second = -1;  // positions of the largest and second largest
        for (int64_t j = 1; j < per_group; ++j)
          if (v[j] > v[first]) first = j;
        for (int64_t j = 0; j < per_group; ++j)
          if (j != first && (second < 0 || v[j] > v[second])) second = j;
        gs[g] = (b && second >= 0) ? v[first] + v[second] : v[first];
        gk[g] = 0;
      }
      for (int64_t r = 0; r < p.topk_groups; ++r) {
        int64_t best = -1;
        for (int64_t g = 0; g < G; ++g)
          if (!gk[g] && (best < 0 || gs[g] > gs[best])) best = g;
        gk[best] = 1;
      }
      for (int64_t g = 0; g < G; ++g)
        if (!gk[g])
          for (int64_t j = 0; j < per_group; ++j) ex[g * per_group + j] = 1;
    }

    // Top-k by selection score, descending, ties to the lower expert id.
    int32_t* ix = I + t * K;
    float* w = W + t * K;
    double wsum = 0;
    for (int64_t k = 0; k < K; ++k) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!ex[e] && (best < 0 || se[e] > se[best])) best = e;
      ex[best] = 1;
      ix[k] = static_cast<int32_t>(best);
      wsum += s[best];
    }
    const double denom = p.norm_topk ? wsum : 1.0;
    for (int64_t k = 0; k < K; ++k) w[k] = static_cast<float>(s[ix[k]] / denom * p.route_scale);
  });
}

void router_backward(const RouterParams& p, const Tensor& logits, const Tensor& scores, const Tensor& idx,
                     const Tensor& dweights, const Tensor& dscores, const Tensor& dlogits) {
  DSV3_PROFILE(MoeRouting);
  const char* op = "router_backward";
  check_params(op, p);
  const int64_t E = p.num_experts, K = p.top_k;
  expect_dtype(op, logits, DType::F32);
  expect_shape(op, logits, {-1, E});
  const int64_t T = logits.dim(0);
  expect_dtype(op, scores, DType::F32);
  expect_shape(op, scores, {T, E});
  expect_dtype(op, idx, DType::I32);
  expect_shape(op, idx, {T, K});
  expect_dtype(op, dweights, DType::F32);
  expect_shape(op, dweights, {T, K});
  expect_dtype(op, dlogits, DType::F32);
  expect_shape(op, dlogits, {T, E});
  for (const Tensor* t : {&logits, &scores, &idx, &dweights, &dlogits}) host::check_backend(op, *t);
  const float* DS = nullptr;
  if (!dscores.empty()) {
    expect_dtype(op, dscores, DType::F32);
    expect_shape(op, dscores, {T, E});
    host::check_backend(op, dscores);
    DS = dscores.f32();
  }
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&logits, &scores, &idx, &dweights, &dscores, &dlogits}))
      return cuda::router_backward(p, logits, scores, idx, dweights, dscores, dlogits);
  const int32_t* I = idx.i32();
  for (int64_t j = 0; j < T * K; ++j)
    DSV3_CHECK(I[j] >= 0 && I[j] < E, op, ": tensor '", idx.name(), "' holds expert ", I[j], " at token ",
               j / K, ", choice ", j % K, ", outside [0, ", E, ")");

  const float* S = scores.f32();
  const float* DW = dweights.f32();
  float* DL = dlogits.f32();
  host::parallel_for("dsv3::router_backward", T, [=](int64_t t) {
    const float* s = S + t * E;
    const float* dw = DW + t * K;
    const int32_t* ix = I + t * K;
    float* g = DL + t * E;  // holds dL/dscores first, then dL/dlogits (dscores may alias dlogits)
    for (int64_t e = 0; e < E; ++e) g[e] = DS ? DS[t * E + e] : 0.0f;

    // weights_k = route_scale * s[idx_k] / sum_j s[idx_j]  (or route_scale * s[idx_k] without norm)
    if (p.norm_topk) {
      double sum = 0, dot = 0;
      for (int64_t k = 0; k < K; ++k) {
        sum += s[ix[k]];
        dot += static_cast<double>(dw[k]) * s[ix[k]];
      }
      const double mean = dot / sum;
      for (int64_t k = 0; k < K; ++k) g[ix[k]] += static_cast<float>(p.route_scale * (dw[k] - mean) / sum);
    } else {
      for (int64_t k = 0; k < K; ++k) g[ix[k]] += p.route_scale * dw[k];
    }

    // Through the score function.
    if (p.sigmoid) {
      for (int64_t e = 0; e < E; ++e) g[e] *= s[e] * (1.0f - s[e]);
    } else {
      double dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += static_cast<double>(g[e]) * s[e];
      for (int64_t e = 0; e < E; ++e) g[e] = static_cast<float>(s[e] * (g[e] - dot));
    }
  });
}

}  // namespace dsv3::ops
