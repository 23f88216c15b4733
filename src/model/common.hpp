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
  int64_t B = 0, S = 0;  // sequences and tokens per sequence; T = B * S rows in every activation
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

}  // namespace dsv3
