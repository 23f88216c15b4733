// CUDA twin of kernels/host/router.cpp: the DeepSeek-V3 gate (scores, group-limited top-k on the
// biased scores, weights from the unbiased ones) and its backward (semantics in kernels/ops.hpp).
// One thread per token, in the host's order of operations; the score function takes exp in double
// rounded to float, which is what the host's correctly rounded expf gives, so the selected experts
// match the host's exactly.
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"
#include "ops.hpp"

namespace dsv3::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxExperts = 512;
constexpr int64_t kMaxGroups = 64;

struct Params {
  int64_t E, K, G, topk_groups;
  bool sigmoid, use_bias, norm_topk;
  float route_scale;
};

__device__ inline float exp_f(float x) { return static_cast<float>(exp(static_cast<double>(x))); }

__global__ void router_fwd_kernel(Params p, const float* logits, const float* bias, float* scores,
                                  int32_t* idx, float* weights, int64_t T) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= T) return;
  const int64_t E = p.E, K = p.K, G = p.G, per_group = E / G;
  const float* l = logits + t * E;
  float* s = scores + t * E;
  float se[kMaxExperts];
  bool ex[kMaxExperts];
  if (p.sigmoid) {
    for (int64_t e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + exp_f(-l[e]));
  } else {
    float m = l[0];
    for (int64_t e = 1; e < E; ++e) m = fmaxf(m, l[e]);
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      s[e] = exp_f(l[e] - m);
      sum += s[e];
    }
    for (int64_t e = 0; e < E; ++e) s[e] = static_cast<float>(s[e] / sum);
  }
  for (int64_t e = 0; e < E; ++e) {
    se[e] = p.use_bias ? s[e] + bias[e] : s[e];
    ex[e] = false;
  }
  if (G > 1) {
    float gs[kMaxGroups];
    bool gk[kMaxGroups];
    for (int64_t g = 0; g < G; ++g) {
      const float* v = se + g * per_group;
      int64_t first = 0, second = -1;
      for (int64_t j = 1; j < per_group; ++j)
        if (v[j] > v[first]) first = j;
      for (int64_t j = 0; j < per_group; ++j)
        if (j != first && (second < 0 || v[j] > v[second])) second = j;
      gs[g] = (p.use_bias && second >= 0) ? v[first] + v[second] : v[first];
      gk[g] = false;
    }
    for (int64_t r = 0; r < p.topk_groups; ++r) {
      int64_t best = -1;
      for (int64_t g = 0; g < G; ++g)
        if (!gk[g] && (best < 0 || gs[g] > gs[best])) best = g;
      gk[best] = true;
    }
    for (int64_t g = 0; g < G; ++g)
      if (!gk[g])
        for (int64_t j = 0; j < per_group; ++j) ex[g * per_group + j] = true;
  }
  int32_t* ix = idx + t * K;
  float* w = weights + t * K;
  double wsum = 0;
  for (int64_t k = 0; k < K; ++k) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e)
      if (!ex[e] && (best < 0 || se[e] > se[best])) best = e;
    ex[best] = true;
    ix[k] = static_cast<int32_t>(best);
    wsum += s[best];
  }
  const double denom = p.norm_topk ? wsum : 1.0;
  for (int64_t k = 0; k < K; ++k) w[k] = static_cast<float>(s[ix[k]] / denom * p.route_scale);
}

__global__ void router_bwd_kernel(Params p, const float* scores, const int32_t* idx, const float* dweights,
                                  const float* dscores, float* dlogits, int64_t T, unsigned long long* flag) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= T) return;
  const int64_t E = p.E, K = p.K;
  const float* s = scores + t * E;
  const float* dw = dweights + t * K;
  const int32_t* ix = idx + t * K;
  float* g = dlogits + t * E;  // dL/dscores first, then dL/dlogits (dscores may alias dlogits)
  for (int64_t k = 0; k < K; ++k)
    if (ix[k] < 0 || ix[k] >= E) {
      flag_position(flag, t * K + k);
      return;
    }
  for (int64_t e = 0; e < E; ++e) g[e] = dscores ? dscores[t * E + e] : 0.0f;
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
  if (p.sigmoid) {
    for (int64_t e = 0; e < E; ++e) g[e] *= s[e] * (1.0f - s[e]);
  } else {
    double dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += static_cast<double>(g[e]) * s[e];
    for (int64_t e = 0; e < E; ++e) g[e] = static_cast<float>(s[e] * (g[e] - dot));
  }
}

Params params(const char* op, const ops::RouterParams& rp) {
  DSV3_CHECK(rp.num_experts <= kMaxExperts && rp.num_groups <= kMaxGroups, op, ": up to ", kMaxExperts,
             " experts in up to ", kMaxGroups, " groups on the GPU, got ", rp.num_experts, " in ",
             rp.num_groups);
  return Params{rp.num_experts, rp.top_k,    rp.num_groups, rp.topk_groups,
                rp.sigmoid,     rp.use_bias, rp.norm_topk,  rp.route_scale};
}

}  // namespace

void router_forward(const ops::RouterParams& rp, const Tensor& logits, const Tensor& bias,
                    const Tensor& scores, const Tensor& idx, const Tensor& weights) {
  const char* op = "router_forward";
  const Params p = params(op, rp);
  check_on_device(op, logits, DType::F32);
  check_on_device(op, scores, DType::F32);
  check_on_device(op, idx, DType::I32);
  check_on_device(op, weights, DType::F32);
  if (rp.use_bias) check_on_device(op, bias, DType::F32);
  const int64_t T = logits.dim(0);
  if (T == 0) return;
  router_fwd_kernel<<<blocks_for(T, kThreads), kThreads, 0, stream()>>>(
      p, logits.f32(), rp.use_bias ? bias.f32() : nullptr, scores.f32(), idx.i32(), weights.f32(), T);
  check_launch(op);
}

void router_backward(const ops::RouterParams& rp, const Tensor& logits, const Tensor& scores,
                     const Tensor& idx, const Tensor& dweights, const Tensor& dscores,
                     const Tensor& dlogits) {
  const char* op = "router_backward";
  const Params p = params(op, rp);
  check_on_device(op, scores, DType::F32);
  check_on_device(op, idx, DType::I32);
  check_on_device(op, dweights, DType::F32);
  check_on_device(op, dlogits, DType::F32);
  if (!dscores.empty()) check_on_device(op, dscores, DType::F32);
  const int64_t T = logits.dim(0);
  if (T == 0) return;
  ErrorFlag flag;
  router_bwd_kernel<<<blocks_for(T, kThreads), kThreads, 0, stream()>>>(
      p, scores.f32(), idx.i32(), dweights.f32(), dscores.empty() ? nullptr : dscores.f32(), dlogits.f32(), T,
      flag.device());
  check_launch(op);
  const int64_t j = flag.read();
  if (j >= 0) {
    int32_t e = 0;
    DSV3_CUDA_CHECK(cudaMemcpy(&e, idx.i32() + j, sizeof(e), cudaMemcpyDeviceToHost));
    raise(op, ": tensor '", idx.name(), "' holds expert ", e, " at token ", j / rp.top_k, ", choice ",
          j % rp.top_k, ", outside [0, ", rp.num_experts, ")");
  }
}

}  // namespace dsv3::cuda
