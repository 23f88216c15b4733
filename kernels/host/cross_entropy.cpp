// Host softmax cross-entropy over the vocabulary for a chunk of rows (the caller chunks the tokens so
// the [C, V] logits stay small). Forward saves the log-sum-exp of each row (computed after subtracting
// the row maximum); backward overwrites the logits with the gradient. A negative target marks an
// ignored row (loss 0, gradient 0). GPU tensors go to the CUDA twin, kernels/cuda/cross_entropy.cu.
//   logits [C, V]; targets [C] i32; losses, lse, dloss [C]
// The shard forms work on columns [first, first + Vs) of the full logits (vocabulary parallelism):
// forward gives the shard's log-sum-exp and the target logit when the target lies in the shard;
// backward takes the combined log-sum-exp and does not renormalise over the shard.
//   logits [C, Vs]; targets [C] i32 (full-vocabulary ids); shard_lse, target_logit, lse, dloss [C]
#include <cmath>

#include "core/error.hpp"
#include "host/fast_math.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

// Shapes, dtypes and device of the logits and targets; returns C.
int64_t check_logits(const char* op, const Tensor& logits, const Tensor& targets) {
  expect_dtype(op, logits, DType::F32);
  expect_shape(op, logits, {-1, -1});
  const int64_t C = logits.dim(0), V = logits.dim(1);
  expect_dtype(op, targets, DType::I32);
  expect_shape(op, targets, {C});
  for (const Tensor* t : {&logits, &targets}) host::check_backend(op, *t);
  DSV3_CHECK(V > 0 || C == 0, op, ": tensor '", logits.name(), "' ", logits.shape_str(),
             " has an empty vocabulary");
  return C;
}

// The target range of host tensors.
void check_targets(const char* op, const Tensor& logits, const Tensor& targets) {
  const int64_t C = logits.dim(0), V = logits.dim(1);
  const int32_t* tg = targets.i32();
  for (int64_t c = 0; c < C; ++c)
    DSV3_CHECK(tg[c] < V, op, ": row ", c, " has target ", tg[c], ", outside the vocabulary [0, ", V,
               ") of tensor '", logits.name(), "'");
}

// The shard form: the columns [first, first + Vs) must fit the vocabulary [0, vocab); returns C.
int64_t check_shard_inputs(const char* op, const Tensor& logits, const Tensor& targets, int64_t first,
                           int64_t vocab) {
  const int64_t C = check_logits(op, logits, targets);
  const int64_t Vs = logits.dim(1);
  DSV3_CHECK(first >= 0 && Vs <= vocab && first <= vocab - Vs, op, ": shard columns [", first, ", ",
             first + Vs, ") of tensor '", logits.name(), "' ", logits.shape_str(),
             " do not fit the vocabulary [0, ", vocab, ")");
  return C;
}

// The targets of host tensors lie below the full vocabulary.
void check_shard_targets(const char* op, const Tensor& logits, const Tensor& targets, int64_t vocab) {
  const int64_t C = logits.dim(0);
  const int32_t* tg = targets.i32();
  for (int64_t c = 0; c < C; ++c)
    DSV3_CHECK(tg[c] < vocab, op, ": row ", c, " has target ", tg[c], ", outside the vocabulary [0, ", vocab,
               ") (shard tensor '", logits.name(), "')");
}

// Dtype, shape and device of a per-row tensor [C].
void check_rows(const char* op, const Tensor& t, int64_t C) {
  expect_dtype(op, t, DType::F32);
  expect_shape(op, t, {C});
  host::check_backend(op, t);
}

}  // namespace

void cross_entropy_forward(const Tensor& logits, const Tensor& targets, const Tensor& losses,
                           const Tensor& lse) {
  DSV3_PROFILE(Head);
  const char* op = "cross_entropy_forward";
  const int64_t C = check_logits(op, logits, targets);
  const int64_t V = logits.dim(1);
  expect_dtype(op, losses, DType::F32);
  expect_shape(op, losses, {C});
  expect_dtype(op, lse, DType::F32);
  expect_shape(op, lse, {C});
  for (const Tensor* t : {&losses, &lse}) host::check_backend(op, *t);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&logits, &targets, &losses, &lse}))
      return cuda::cross_entropy_forward(logits, targets, losses, lse);
  check_targets(op, logits, targets);
  const float* L = logits.f32();
  const int32_t* tg = targets.i32();
  float* out = losses.f32();
  float* ls = lse.f32();
  host::parallel_for("dsv3::cross_entropy_forward", C, [=](int64_t c) {
    const float* l = L + c * V;
    const float m = host::lane_max_f32(l, V);
    const double sum = host::exp_shifted_sum_f64(l, V, m);
    const double z = m + std::log(sum);
    ls[c] = static_cast<float>(z);
    out[c] = tg[c] < 0 ? 0.0f : static_cast<float>(z - l[tg[c]]);
  });
}

void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                            const Tensor& dloss) {
  DSV3_PROFILE(Head);
  const char* op = "cross_entropy_backward";
  const int64_t C = check_logits(op, logits, targets);
  const int64_t V = logits.dim(1);
  expect_dtype(op, lse, DType::F32);
  expect_shape(op, lse, {C});
  expect_dtype(op, dloss, DType::F32);
  expect_shape(op, dloss, {C});
  for (const Tensor* t : {&lse, &dloss}) host::check_backend(op, *t);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&logits, &targets, &lse, &dloss}))
      return cuda::cross_entropy_backward(logits, targets, lse, dloss);
  check_targets(op, logits, targets);
  float* L = logits.f32();
  const int32_t* tg = targets.i32();
  const float* ls = lse.f32();
  const float* dl = dloss.f32();
  host::parallel_for("dsv3::cross_entropy_backward", C, [=](int64_t c) {
    float* l = L + c * V;
    if (tg[c] < 0) {
      for (int64_t v = 0; v < V; ++v) l[v] = 0.0f;
      return;
    }
    // exp(l - lse) renormalised by its sum: exact softmax even where the f32 lse is coarse (|logits| large).
    const float z = ls[c], g = dl[c];
    host::exp_shifted_inplace(l, V, z);
    const double sum = host::lane_sum_f64(l, V);
    const float f = static_cast<float>(g / sum);
    for (int64_t v = 0; v < V; ++v) l[v] *= f;
    l[tg[c]] -= g;
  });
}

void cross_entropy_shard_forward(const Tensor& logits, const Tensor& targets, int64_t first, int64_t vocab,
                                 const Tensor& shard_lse, const Tensor& target_logit) {
  DSV3_PROFILE(Head);
  const char* op = "cross_entropy_shard_forward";
  const int64_t C = check_shard_inputs(op, logits, targets, first, vocab);
  const int64_t Vs = logits.dim(1);
  check_rows(op, shard_lse, C);
  check_rows(op, target_logit, C);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&logits, &targets, &shard_lse, &target_logit}))
      return cuda::cross_entropy_shard_forward(logits, targets, first, vocab, shard_lse, target_logit);
  check_shard_targets(op, logits, targets, vocab);
  const float* L = logits.f32();
  const int32_t* tg = targets.i32();
  float* ls = shard_lse.f32();
  float* tl = target_logit.f32();
  host::parallel_for("dsv3::cross_entropy_shard_forward", C, [=](int64_t c) {
    const float* l = L + c * Vs;
    const float m = host::lane_max_f32(l, Vs);
    const double sum = host::exp_shifted_sum_f64(l, Vs, m);
    ls[c] = static_cast<float>(m + std::log(sum));
    const int64_t j = static_cast<int64_t>(tg[c]) - first;
    tl[c] = tg[c] >= 0 && j >= 0 && j < Vs ? l[j] : 0.0f;
  });
}

void cross_entropy_shard_backward(const Tensor& logits, const Tensor& targets, int64_t first, int64_t vocab,
                                  const Tensor& lse, const Tensor& dloss) {
  DSV3_PROFILE(Head);
  const char* op = "cross_entropy_shard_backward";
  const int64_t C = check_shard_inputs(op, logits, targets, first, vocab);
  const int64_t Vs = logits.dim(1);
  check_rows(op, lse, C);
  check_rows(op, dloss, C);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&logits, &targets, &lse, &dloss}))
      return cuda::cross_entropy_shard_backward(logits, targets, first, vocab, lse, dloss);
  check_shard_targets(op, logits, targets, vocab);
  float* L = logits.f32();
  const int32_t* tg = targets.i32();
  const float* ls = lse.f32();
  const float* dl = dloss.f32();
  host::parallel_for("dsv3::cross_entropy_shard_backward", C, [=](int64_t c) {
    float* l = L + c * Vs;
    if (tg[c] < 0) {
      for (int64_t v = 0; v < Vs; ++v) l[v] = 0.0f;
      return;
    }
    // No renormalisation: the shard holds only part of the softmax mass, lse is the full one.
    const float g = dl[c];
    host::exp_shifted_inplace(l, Vs, ls[c]);
    const int64_t j = static_cast<int64_t>(tg[c]) - first;
    const bool inside = j >= 0 && j < Vs;
    const float p = inside ? l[j] : 0.0f;
    for (int64_t v = 0; v < Vs; ++v) l[v] *= g;
    if (inside) l[j] = g * (p - 1.0f);
  });
}

}  // namespace dsv3::ops
