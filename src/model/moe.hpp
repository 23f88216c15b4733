// DeepSeekMoE layer (MODEL.md, "MoE"): sigmoid/softmax router with a selection-only bias,
// group-limited top-k, routed experts run as per-expert GEMMs on tokens permuted by expert,
// shared experts, optional capacity-factor dropping, and the sequence-wise balance loss.
#pragma once

#include <memory>
#include <vector>

#include "model/common.hpp"
#include "model/mlp.hpp"
#include "model/params.hpp"

namespace dsv3 {

class MoE {
 public:
  MoE(const ModelConfig& m, ParamStore& ps, const std::string& prefix);  // prefix = model.layers.{l}.mlp
  struct Saved {
    Tensor input;                              // [T, d] (owned by the block)
    OwnedTensor logits, scores, idx, weights;  // [T, E], [T, E], [T, K] i32, [T, K]
    ops::DispatchPlan plan;
    OwnedTensor xs, g, u, h, ys;  // [R, d], [R, F], [R, F], [R, F], [R, d]
    SwiGLU::Saved shared;
    double balance_loss = 0;
  };
  // y [T, d] += MoE(x); returns nothing, the balance loss is in s.balance_loss.
  void forward(const ParamStore& ps, const Tensor& x, const Tensor& y, Saved& s,
               const StepContext& ctx) const;
  // dx [T, d] overwritten; includes the balance-loss gradient (coefficient 1).
  void backward(const ParamStore& ps, const Saved& s, const Tensor& dy, const Tensor& dx,
                const StepContext& ctx) const;

  // Selective recompute of the expert and shared-expert SwiGLU products.
  void drop_recomputable(Saved& s) const;
  void recompute(Saved& s) const;
  // Tokens routed to each expert in the last forward (kept assignments), for the bias update.
  static std::vector<int64_t> expert_load(const Saved& s);
  size_t bias_state() const { return bias_; }
  bool has_bias() const { return router_.use_bias; }
  const ops::RouterParams& router() const { return router_; }
  int64_t capacity(int64_t tokens) const;

 private:
  int64_t d_, E_, K_, F_;
  double capacity_factor_, alpha_;
  ops::RouterParams router_;
  size_t gate_, bias_ = 0;
  std::vector<size_t> w_gate_, w_up_, w_down_;  // per expert
  std::unique_ptr<SwiGLU> shared_;
};

}  // namespace dsv3
