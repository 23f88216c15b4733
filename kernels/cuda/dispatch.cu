// CUDA twin of kernels/host/dispatch.cpp: the dispatch plan (slots grouped by expert in slot order,
// capped at the capacity), the gather into expert order and the weighted combine, forward and
// backward (semantics in kernels/ops.hpp). The plan is built by one thread per expert walking the
// slots in order, which gives the host's positions exactly; the row gather and scatter kernels own
// their output rows, so nothing is summed with atomics and results are deterministic.
#include <vector>

#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"
#include "ops.hpp"

namespace dsv3::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void check_experts_kernel(const int32_t* idx, int64_t slots, int64_t E, unsigned long long* flag) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j < slots && (idx[j] < 0 || idx[j] >= E)) flag_position(flag, j);
}

// pos[j] = rank of slot j among the slots of its expert (slot order); count[e] = slots of expert e.
__global__ void positions_kernel(const int32_t* idx, int64_t slots, int64_t E, int32_t* pos, int32_t* count) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= E) return;
  int32_t c = 0;
  for (int64_t j = 0; j < slots; ++j)
    if (idx[j] == e) pos[j] = c++;
  count[e] = c;
}

// offsets[e + 1] = offsets[e] + min(count[e], capacity); dropped = sum of the excess (one thread).
__global__ void offsets_kernel(const int32_t* count, int64_t E, int64_t capacity, int32_t* offsets,
                               long long* dropped) {
  int32_t off = 0;
  long long drop = 0;
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int32_t kept = capacity > 0 && count[e] > capacity ? int32_t(capacity) : count[e];
    drop += count[e] - kept;
    off += kept;
    offsets[e + 1] = off;
  }
  *dropped = drop;
}

__global__ void rows_kernel(const int32_t* idx, const int32_t* pos, const int32_t* offsets, int64_t slots,
                            int64_t capacity, int32_t* row_of_slot, int32_t* slot_of_row) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= slots) return;
  const bool kept = capacity == 0 || pos[j] < capacity;
  const int32_t row = kept ? offsets[idx[j]] + pos[j] : -1;
  row_of_slot[j] = row;
  if (kept) slot_of_row[row] = int32_t(j);
}

// xs[r, :] = x[slot_of_row[r] / K, :]
__global__ void gather_kernel(const int32_t* sor, int64_t K, const float* x, float* xs, int64_t R,
                              int64_t D) {
  const int64_t n = R * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / D, d = i % D;
    xs[i] = x[(sor[r] / K) * D + d];
  }
}

// y[t, :] (= or +=) sum_k w[t, k] * ys[row_of_slot[t*K + k], :] (w == nullptr: weight 1)
__global__ void scatter_kernel(const int32_t* ros, int64_t K, const float* ys, const float* w, float* y,
                               int64_t T, int64_t D, bool accumulate) {
  const int64_t n = T * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / D, d = i % D;
    float acc = accumulate ? y[i] : 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t r = ros[t * K + k];
      if (r < 0) continue;
      acc += (w ? w[t * K + k] : 1.0f) * ys[int64_t(r) * D + d];
    }
    y[i] = acc;
  }
}

// dys[r, :] = w[slot] * dy[slot / K, :]
__global__ void combine_rows_kernel(const int32_t* sor, int64_t K, const float* w, const float* dy,
                                    float* dys, int64_t R, int64_t D) {
  const int64_t n = R * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / D, d = i % D, slot = sor[r];
    dys[i] = w[slot] * dy[(slot / K) * D + d];
  }
}

// dweights[t, k] = <dy[t], ys[row]> in double, 0 for dropped slots; one warp per slot.
__global__ void combine_dw_kernel(const int32_t* ros, int64_t K, const float* dy, const float* ys, float* dw,
                                  int64_t slots, int64_t D) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x / 32) + (threadIdx.x >> 5);
  if (j >= slots) return;
  const int lane = threadIdx.x & 31;
  const int32_t r = ros[j];
  double acc = 0.0;
  if (r >= 0)
    for (int64_t d = lane; d < D; d += 32) acc += double(dy[(j / K) * D + d]) * ys[int64_t(r) * D + d];
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) dw[j] = float(acc);
}

}  // namespace

ops::DispatchPlan make_dispatch_plan(const Tensor& idx, int64_t num_experts, int64_t capacity) {
  const char* op = "make_dispatch_plan";
  check_on_device(op, idx, DType::I32);
  const int64_t T = idx.dim(0), K = idx.dim(1), E = num_experts, slots = T * K;
  {
    ErrorFlag flag;
    if (slots > 0) {
      check_experts_kernel<<<blocks_for(slots, kThreads), kThreads, 0, stream()>>>(idx.i32(), slots, E,
                                                                                   flag.device());
      check_launch(op);
    }
    const int64_t j = flag.read();
    if (j >= 0) {
      int32_t e = 0;
      DSV3_CUDA_CHECK(cudaMemcpy(&e, idx.i32() + j, sizeof(e), cudaMemcpyDeviceToHost));
      raise(op, ": tensor '", idx.name(), "' holds expert ", e, " at token ", j / K, ", choice ", j % K,
            ", outside [0, ", E, ")");
    }
  }
  ops::DispatchPlan plan;
  plan.tokens = T;
  plan.top_k = K;
  plan.num_experts = E;
  plan.offsets = OwnedTensor(DType::I32, {E + 1}, "offsets", Device::Cuda);
  plan.row_of_slot = OwnedTensor(DType::I32, {slots}, "row_of_slot", Device::Cuda);
  OwnedTensor pos(DType::I32, {slots}, "slot_positions", Device::Cuda, Fill::Uninitialized);
  OwnedTensor count(DType::I32, {E}, "expert_counts", Device::Cuda);
  OwnedTensor dropped(DType::I32, {2}, "dropped", Device::Cuda);  // one long long
  positions_kernel<<<blocks_for(E, kThreads), kThreads, 0, stream()>>>(idx.i32(), slots, E, pos.i32(),
                                                                       count.i32());
  check_launch(op);
  offsets_kernel<<<1, 1, 0, stream()>>>(count.i32(), E, capacity, plan.offsets.i32(),
                                        static_cast<long long*>(dropped.t.data()));
  check_launch(op);
  int32_t rows = 0;
  long long drop = 0;
  DSV3_CUDA_CHECK(
      cudaMemcpyAsync(&rows, plan.offsets.i32() + E, sizeof(rows), cudaMemcpyDeviceToHost, stream()));
  DSV3_CUDA_CHECK(cudaMemcpyAsync(&drop, dropped.t.data(), sizeof(drop), cudaMemcpyDeviceToHost, stream()));
  DSV3_CUDA_CHECK(cudaStreamSynchronize(stream()));
  plan.rows = rows;
  plan.dropped = drop;
  plan.slot_of_row = OwnedTensor(DType::I32, {plan.rows}, "slot_of_row", Device::Cuda);
  if (slots > 0) {
    rows_kernel<<<blocks_for(slots, kThreads), kThreads, 0, stream()>>>(
        idx.i32(), pos.i32(), plan.offsets.i32(), slots, capacity, plan.row_of_slot.i32(),
        plan.slot_of_row.i32());
    check_launch(op);
  }
  return plan;
}

void dispatch_forward(const ops::DispatchPlan& plan, const Tensor& x, const Tensor& xs) {
  const char* op = "dispatch_forward";
  check_on_device(op, x, DType::F32);
  check_on_device(op, xs, DType::F32);
  const int64_t R = plan.rows, D = x.dim(1);
  if (R * D == 0) return;
  gather_kernel<<<blocks_for(R * D, kThreads), kThreads, 0, stream()>>>(plan.slot_of_row.i32(), plan.top_k,
                                                                        x.f32(), xs.f32(), R, D);
  check_launch(op);
}

void dispatch_backward(const ops::DispatchPlan& plan, const Tensor& dxs, const Tensor& dx, bool accumulate) {
  const char* op = "dispatch_backward";
  check_on_device(op, dxs, DType::F32);
  check_on_device(op, dx, DType::F32);
  const int64_t T = plan.tokens, D = dx.dim(1);
  if (T * D == 0) return;
  scatter_kernel<<<blocks_for(T * D, kThreads), kThreads, 0, stream()>>>(
      plan.row_of_slot.i32(), plan.top_k, dxs.f32(), nullptr, dx.f32(), T, D, accumulate);
  check_launch(op);
}

void combine_forward(const ops::DispatchPlan& plan, const Tensor& ys, const Tensor& weights, const Tensor& y,
                     bool accumulate) {
  const char* op = "combine_forward";
  for (const Tensor* t : {&ys, &weights, &y}) check_on_device(op, *t, DType::F32);
  const int64_t T = plan.tokens, D = y.dim(1);
  if (T * D == 0) return;
  scatter_kernel<<<blocks_for(T * D, kThreads), kThreads, 0, stream()>>>(
      plan.row_of_slot.i32(), plan.top_k, ys.f32(), weights.f32(), y.f32(), T, D, accumulate);
  check_launch(op);
}

void combine_backward(const ops::DispatchPlan& plan, const Tensor& ys, const Tensor& weights,
                      const Tensor& dy, const Tensor& dys, const Tensor& dweights) {
  const char* op = "combine_backward";
  for (const Tensor* t : {&ys, &weights, &dy, &dys, &dweights}) check_on_device(op, *t, DType::F32);
  const int64_t R = plan.rows, D = dy.dim(1), slots = plan.tokens * plan.top_k;
  if (R * D > 0) {
    combine_rows_kernel<<<blocks_for(R * D, kThreads), kThreads, 0, stream()>>>(
        plan.slot_of_row.i32(), plan.top_k, weights.f32(), dy.f32(), dys.f32(), R, D);
    check_launch(op);
  }
  if (slots > 0) {
    combine_dw_kernel<<<blocks_for(slots * 32, kThreads), kThreads, 0, stream()>>>(
        plan.row_of_slot.i32(), plan.top_k, dy.f32(), ys.f32(), dweights.f32(), slots, D);
    check_launch(op);
  }
}

}  // namespace dsv3::cuda
