// Things every layer of the model shares: the shape of the micro-batch, the RoPE tables, the
// attention scale and the recompute policy, passed explicitly to forward/backward.
#pragma once

#include <cstdint>
#include <string>

#include "config/config.hpp"
#include "core/tensor.hpp"
#include "model/parallel.hpp"
#include "ops.hpp"

namespace dsv3 {

enum class Recompute { None, Selective, Full };
Recompute parse_recompute(const std::string& s);

struct StepContext {
  int64_t B = 0, S = 0;  // sequences and tokens per sequence; T = B * S token rows (the residual
                         // stream has ModelParallel::stream_rows(T) of them on this rank)
  int64_t T() const { return B * S; }
  Tensor rope_cos, rope_sin;  // [S, R/2]
  float attn_scale = 1.0f;
  Recompute recompute = Recompute::None;
  bool training = true;     // false: forward only, nothing saved for backward
  float grad_scale = 1.0f;  // multiplies every loss term's gradient (gradient accumulation)
};

ops::RopeParams rope_params(const ModelConfig& m);
// (n + R)^-0.5, times mscale^2 under YaRN (MODEL.md, MLA).
float attention_scale(const ModelConfig& m);

// A fresh zero-filled f32 activation.
inline OwnedTensor act(std::vector<int64_t> shape, const std::string& name) {
  return OwnedTensor(DType::F32, std::move(shape), name);
}
// A fresh f32 activation with undefined contents, for outputs the next op overwrites completely
// (never for accumulating outputs).
inline OwnedTensor act_out(std::vector<int64_t> shape, const std::string& name) {
  return OwnedTensor(DType::F32, std::move(shape), name, Device::Host, Fill::Uninitialized);
}

// Sums t over the tensor-parallel group in place (nothing without TP).
void tp_allreduce(const ModelParallel& mp, const Tensor& t);

// The edges of a tensor-parallel region (Megatron's f/g operators), sequence-parallel aware. Inside a
// region tensors have all T rows; outside, the residual stream has stream_rows(T) rows.
// Entry (forward) and exit gradient (backward): the stream rows -> all rows. Under sequence
// parallelism an all-gather into `holder`; otherwise `local` itself (holder untouched).
Tensor tp_gather_rows(const ModelParallel& mp, const Tensor& local, OwnedTensor& holder, const char* name);
// Exit (forward) and entry gradient (backward): y (= or +=) the sum over the TP group of `part` [T, d],
// restricted to this rank's stream rows: reduce-scatter under sequence parallelism, all-reduce
// otherwise. `part` is clobbered.
void tp_reduce_rows(const ModelParallel& mp, const Tensor& part, const Tensor& y, bool accumulate);
// A full gradient that every TP rank holds identically [T, d] -> this rank's stream rows of it.
void tp_slice_rows(const ModelParallel& mp, const Tensor& full, const Tensor& y, bool accumulate);
// RMSNorm backward on stream rows; under sequence parallelism the weight gradient, a partial sum over
// the TP ranks' rows, is summed over the group before it accumulates into dw.
void stream_rmsnorm_backward(const ModelParallel& mp, const Tensor& x, const Tensor& w, const Tensor& rstd,
                             const Tensor& dy, const Tensor& dx, const Tensor& dw,
                             bool accumulate_dx = false);

}  // namespace dsv3
