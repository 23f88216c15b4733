// Host complementary sequence-wise balance loss (DeepSeek-V3 report, eqs. 17-20), averaged over the
// sequences of a micro-batch. Per sequence b of S tokens:
//   s'[t,i] = scores[t,i] / sum_j scores[t,j],  P_i = mean_t s'[t,i],
//   f_i = E / (K * S) * #{t : i in idx[t]},      loss_b = alpha * sum_i f_i * P_i;
// loss = mean_b loss_b. f is a constant for the backward (the selection has no gradient).
//   scores, dscores [B*S, E]; idx [B*S, K] i32
// GPU tensors go to the CUDA twin, kernels/cuda/balance_loss.cu.
#include <vector>

#include "core/error.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

struct Dims {
  int64_t B, S, E, K;
};

Dims check_inputs(const char* op, const Tensor& scores, const Tensor& idx, int64_t batch) {
  expect_dtype(op, scores, DType::F32);
  expect_shape(op, scores, {-1, -1});
  expect_dtype(op, idx, DType::I32);
  expect_shape(op, idx, {scores.dim(0), -1});
  for (const Tensor* t : {&scores, &idx}) host::check_backend(op, *t);
  const int64_t rows = scores.dim(0), E = scores.dim(1), K = idx.dim(1);
  DSV3_CHECK(batch > 0 && rows % batch == 0, op, ": batch ", batch, " must be positive and divide the ", rows,
             " rows of tensor '", scores.name(), "' ", scores.shape_str());
  DSV3_CHECK(E > 0 && K > 0, op, ": tensors '", scores.name(), "' ", scores.shape_str(), " and '", idx.name(),
             "' ", idx.shape_str(), " need at least one expert and one choice");
  return {batch, rows / batch, E, K};
}

// The expert ids of host tensors lie in [0, E).
void check_ids(const char* op, const Tensor& idx, const Dims& d) {
  const int64_t rows = d.B * d.S, E = d.E, K = d.K;
  const int32_t* I = idx.i32();
  for (int64_t j = 0; j < rows * K; ++j)
    DSV3_CHECK(I[j] >= 0 && I[j] < E, op, ": tensor '", idx.name(), "' holds expert ", I[j], " at token ",
               j / K, ", choice ", j % K, ", outside [0, ", E, ")");
}

// counts[b*E + i] = number of tokens of sequence b that chose expert i (a token counts once).
std::vector<double> expert_counts(const Dims& d, const int32_t* I) {
  std::vector<double> counts(static_cast<size_t>(d.B * d.E), 0.0);
  double* C = counts.data();
  host::parallel_for("dsv3::seq_balance_loss_counts", d.B, [=](int64_t b) {
    double* cnt = C + b * d.E;
    for (int64_t t = b * d.S; t < (b + 1) * d.S; ++t) {
      const int32_t* ix = I + t * d.K;
      for (int64_t k = 0; k < d.K; ++k) {
        bool repeat = false;
        for (int64_t j = 0; j < k; ++j) repeat = repeat || ix[j] == ix[k];
        if (!repeat) cnt[ix[k]] += 1.0;
      }
    }
  });
  return counts;
}

}  // namespace

double seq_balance_loss_forward(const Tensor& scores, const Tensor& idx, int64_t batch, double alpha) {
  DSV3_PROFILE(MoeRouting);
  const char* op = "seq_balance_loss_forward";
  const Dims d = check_inputs(op, scores, idx, batch);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&scores, &idx})) return cuda::seq_balance_loss_forward(scores, idx, batch, alpha);
  check_ids(op, idx, d);
  if (d.S == 0) return 0.0;
  const float* SC = scores.f32();
  const std::vector<double> counts = expert_counts(d, idx.i32());
  std::vector<double> seq_loss(static_cast<size_t>(d.B), 0.0);
  std::vector<double> prob(static_cast<size_t>(d.B * d.E), 0.0);
  const double* cnt = counts.data();
  double* out = seq_loss.data();
  double* Pb = prob.data();
  const double f_scale = static_cast<double>(d.E) / static_cast<double>(d.K * d.S);
  host::parallel_for("dsv3::seq_balance_loss_forward", d.B, [=](int64_t b) {
    double* P = Pb + b * d.E;
    for (int64_t t = b * d.S; t < (b + 1) * d.S; ++t) {
      const float* s = SC + t * d.E;
      double z = 0;
      for (int64_t i = 0; i < d.E; ++i) z += s[i];
      for (int64_t i = 0; i < d.E; ++i) P[i] += s[i] / z;
    }
    double acc = 0;
    for (int64_t i = 0; i < d.E; ++i) acc += f_scale * cnt[b * d.E + i] * (P[i] / static_cast<double>(d.S));
    out[b] = alpha * acc;
  });
  double total = 0;
  for (double v : seq_loss) total += v;
  return total / static_cast<double>(d.B);
}

void seq_balance_loss_backward(const Tensor& scores, const Tensor& idx, int64_t batch, double alpha,
                               double dloss, const Tensor& dscores) {
  DSV3_PROFILE(MoeRouting);
  const char* op = "seq_balance_loss_backward";
  const Dims d = check_inputs(op, scores, idx, batch);
  expect_dtype(op, dscores, DType::F32);
  expect_shape(op, dscores, {d.B * d.S, d.E});
  host::check_backend(op, dscores);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&scores, &idx, &dscores}))
      return cuda::seq_balance_loss_backward(scores, idx, batch, alpha, dloss, dscores);
  check_ids(op, idx, d);
  if (d.S == 0) return;
  const float* SC = scores.f32();
  float* DS = dscores.f32();
  // c[b*E + i] = dloss * alpha / B * f_i / S: the gradient of the loss w.r.t. s'[t,i] for t in sequence b.
  std::vector<double> c = expert_counts(d, idx.i32());
  const double scale = dloss * alpha / static_cast<double>(d.B) * static_cast<double>(d.E) /
                       static_cast<double>(d.K * d.S) / static_cast<double>(d.S);
  for (double& v : c) v *= scale;
  const double* cb = c.data();
  // ds[t,j] += (c_j - sum_i c_i s'[t,i]) / z_t,   z_t = sum_i s[t,i]
  host::parallel_for("dsv3::seq_balance_loss_backward", d.B * d.S, [=](int64_t t) {
    const float* s = SC + t * d.E;
    const double* ct = cb + (t / d.S) * d.E;
    double z = 0, dot = 0;
    for (int64_t i = 0; i < d.E; ++i) {
      z += s[i];
      dot += ct[i] * s[i];
    }
    const double mean = dot / z;
    float* g = DS + t * d.E;
    for (int64_t i = 0; i < d.E; ++i) g[i] += static_cast<float>((ct[i] - mean) / z);
  });
}

}  // namespace dsv3::ops
