// Host token dispatch and combine for the MoE layer. A DispatchPlan groups the T*K (token, choice)
// slots by expert, in slot (= token) order inside each expert, optionally capped at `capacity` slots
// per expert; dispatch gathers token rows into the expert-sorted buffer, combine scatters the expert
// outputs back weighted by the routing weights. Forward and backward of both live here. GPU tensors
// (and plans built from GPU ids) go to the CUDA twin, kernels/cuda/dispatch.cu.
//   idx [T, K] i32; x, dx, y, dy [T, D]; xs, dxs, ys, dys [R, D]; weights, dweights [T, K]
#include <cstdint>
#include <vector>

#include "core/error.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

using host::check_host;

void check_plan(const char* op, const DispatchPlan& plan) {
  DSV3_CHECK(plan.offsets.t.numel() == plan.num_experts + 1 &&
                 plan.row_of_slot.t.numel() == plan.tokens * plan.top_k &&
                 plan.slot_of_row.t.numel() == plan.rows,
             op, ": the dispatch plan is inconsistent (build it with make_dispatch_plan)");
}

}  // namespace

DispatchPlan make_dispatch_plan(const Tensor& idx, int64_t num_experts, int64_t capacity) {
  DSV3_PROFILE(MoeRouting);
  const char* op = "make_dispatch_plan";
  expect_dtype(op, idx, DType::I32);
  expect_shape(op, idx, {-1, -1});
  host::check_backend(op, idx);
  DSV3_CHECK(num_experts > 0, op, ": num_experts must be positive, got ", num_experts);
  DSV3_CHECK(capacity >= 0, op, ": capacity must be >= 0 (0 = unlimited), got ", capacity);
  const int64_t T = idx.dim(0), K = idx.dim(1), E = num_experts, slots = T * K;
  DSV3_CHECK(slots <= INT32_MAX, op, ": ", slots, " slots do not fit the i32 plan arrays");
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&idx})) return cuda::make_dispatch_plan(idx, num_experts, capacity);
  const int32_t* I = idx.i32();
  for (int64_t j = 0; j < slots; ++j)
    DSV3_CHECK(I[j] >= 0 && I[j] < E, op, ": tensor '", idx.name(), "' holds expert ", I[j], " at token ",
               j / K, ", choice ", j % K, ", outside [0, ", E, ")");

  DispatchPlan plan;
  plan.tokens = T;
  plan.top_k = K;
  plan.num_experts = E;
  plan.offsets = OwnedTensor(DType::I32, {E + 1}, "offsets");
  plan.row_of_slot = OwnedTensor(DType::I32, {slots}, "row_of_slot");

  // Position of every slot inside its expert (a running count in slot order: a sequential scan).
  std::vector<int64_t> count(static_cast<size_t>(E), 0), pos_buf(static_cast<size_t>(slots));
  for (int64_t j = 0; j < slots; ++j) pos_buf[j] = count[I[j]]++;
  const int64_t* pos = pos_buf.data();
  int32_t* off = plan.offsets.i32();
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t kept = capacity > 0 && count[e] > capacity ? capacity : count[e];
    plan.dropped += count[e] - kept;
    off[e + 1] = static_cast<int32_t>(off[e] + kept);
  }
  plan.rows = off[E];
  plan.slot_of_row = OwnedTensor(DType::I32, {plan.rows}, "slot_of_row");

  int32_t* ros = plan.row_of_slot.i32();
  int32_t* sor = plan.slot_of_row.i32();
  host::parallel_for("dsv3::make_dispatch_plan", slots, [=](int64_t j) {
    const bool kept = capacity == 0 || pos[j] < capacity;
    const int32_t row = kept ? static_cast<int32_t>(off[I[j]] + pos[j]) : -1;
    ros[j] = row;
    if (kept) sor[row] = static_cast<int32_t>(j);
  });
  return plan;
}

void dispatch_forward(const DispatchPlan& plan, const Tensor& x, const Tensor& xs) {
  DSV3_PROFILE(MoeRouting);
  const char* op = "dispatch_forward";
  check_plan(op, plan);
  expect_dtype(op, x, DType::F32);
  expect_shape(op, x, {plan.tokens, -1});
  const int64_t D = x.dim(1);
  expect_dtype(op, xs, DType::F32);
  expect_shape(op, xs, {plan.rows, D});
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&x, &xs, &plan.slot_of_row.t})) return cuda::dispatch_forward(plan, x, xs);
  check_host(op, x);
  check_host(op, xs);
  const int32_t* sor = plan.slot_of_row.i32();
  const int64_t K = plan.top_k;
  const float* X = x.f32();
  float* XS = xs.f32();
  host::parallel_for("dsv3::dispatch_forward", plan.rows, [=](int64_t r) {
    const float* src = X + (sor[r] / K) * D;
    float* dst = XS + r * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = src[d];
  });
}

void dispatch_backward(const DispatchPlan& plan, const Tensor& dxs, const Tensor& dx, bool accumulate) {
  DSV3_PROFILE(MoeRouting);
  const char* op = "dispatch_backward";
  check_plan(op, plan);
  expect_dtype(op, dxs, DType::F32);
  expect_shape(op, dxs, {plan.rows, -1});
  const int64_t D = dxs.dim(1);
  expect_dtype(op, dx, DType::F32);
  expect_shape(op, dx, {plan.tokens, D});
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&dxs, &dx, &plan.row_of_slot.t}))
      return cuda::dispatch_backward(plan, dxs, dx, accumulate);
  check_host(op, dxs);
  check_host(op, dx);
  const int32_t* ros = plan.row_of_slot.i32();
  const int64_t K = plan.top_k;
  const float* DXS = dxs.f32();
  float* DX = dx.f32();
  host::parallel_for("dsv3::dispatch_backward", plan.tokens, [=](int64_t t) {
    float* dst = DX + t * D;
    if (!accumulate)
      for (int64_t d = 0; d < D; ++d) dst[d] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t r = ros[t * K + k];
      if (r < 0) continue;
      const float* src = DXS + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
    }
  });
}

void combine_forward(const DispatchPlan& plan, const Tensor& ys, const Tensor& weights, const Tensor& y,
                     bool accumulate) {
  DSV3_PROFILE(MoeRouting);
  const char* op = "combine_forward";
  check_plan(op, plan);
  expect_dtype(op, ys, DType::F32);
  expect_shape(op, ys, {plan.rows, -1});
  const int64_t D = ys.dim(1), K = plan.top_k;
  expect_dtype(op, weights, DType::F32);
  expect_shape(op, weights, {plan.tokens, K});
  expect_dtype(op, y, DType::F32);
  expect_shape(op, y, {plan.tokens, D});
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&ys, &weights, &y, &plan.row_of_slot.t}))
      return cuda::combine_forward(plan, ys, weights, y, accumulate);
  for (const Tensor* t : {&ys, &weights, &y}) check_host(op, *t);
  const int32_t* ros = plan.row_of_slot.i32();
  const float* YS = ys.f32();
  const float* W = weights.f32();
  float* Y = y.f32();
  host::parallel_for("dsv3::combine_forward", plan.tokens, [=](int64_t t) {
    float* dst = Y + t * D;
    if (!accumulate)
      for (int64_t d = 0; d < D; ++d) dst[d] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t r = ros[t * K + k];
      if (r < 0) continue;
      const float w = W[t * K + k];
      const float* src = YS + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] += w * src[d];
    }
  });
}

void combine_backward(const DispatchPlan& plan, const Tensor& ys, const Tensor& weights, const Tensor& dy,
                      const Tensor& dys, const Tensor& dweights) {
  DSV3_PROFILE(MoeRouting);
  const char* op = "combine_backward";
  check_plan(op, plan);
  expect_dtype(op, ys, DType::F32);
  expect_shape(op, ys, {plan.rows, -1});
  const int64_t D = ys.dim(1), K = plan.top_k;
  expect_dtype(op, weights, DType::F32);
  expect_shape(op, weights, {plan.tokens, K});
  expect_dtype(op, dy, DType::F32);
  expect_shape(op, dy, {plan.tokens, D});
  expect_dtype(op, dys, DType::F32);
  expect_shape(op, dys, {plan.rows, D});
  expect_dtype(op, dweights, DType::F32);
  expect_shape(op, dweights, {plan.tokens, K});
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&ys, &weights, &dy, &dys, &dweights, &plan.row_of_slot.t}))
      return cuda::combine_backward(plan, ys, weights, dy, dys, dweights);
  for (const Tensor* t : {&ys, &weights, &dy, &dys, &dweights}) check_host(op, *t);
  const int32_t* ros = plan.row_of_slot.i32();
  const int32_t* sor = plan.slot_of_row.i32();
  const float* YS = ys.f32();
  const float* W = weights.f32();
  const float* DY = dy.f32();
  float* DYS = dys.f32();
  float* DW = dweights.f32();
  // dys[r] = weights[slot] * dy[token of r]
  host::parallel_for("dsv3::combine_backward_rows", plan.rows, [=](int64_t r) {
    const int64_t slot = sor[r];
    const float w = W[slot];
    const float* src = DY + (slot / K) * D;
    float* dst = DYS + r * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = w * src[d];
  });
  // dweights[t, k] = <dy[t], ys[row]>, 0 for dropped slots
  host::parallel_for("dsv3::combine_backward_weights", plan.tokens, [=](int64_t t) {
    const float* g = DY + t * D;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t r = ros[t * K + k];
      double acc = 0;
      if (r >= 0) {
        const float* v = YS + r * D;
        for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(g[d]) * v[d];
      }
      DW[t * K + k] = static_cast<float>(acc);
    }
  });
}

}  // namespace dsv3::ops
