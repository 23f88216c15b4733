// DeepSeekMoE layer (MODEL.md, "MoE"): sigmoid/softmax router with a selection-only bias,
// group-limited top-k, routed experts run as per-expert GEMMs on tokens permuted by expert,
// shared experts, optional capacity-factor dropping, and the sequence-wise balance loss.
#pragma once

#include <memory>
#include <vector>

#include "model/common.hpp"
#include "model/expert_exchange.hpp"
#include "model/mlp.hpp"
#include "model/params.hpp"

namespace dsv3 {

class MoE {
 public:
  // prefix = model.layers.{l}.mlp. Under expert parallelism this rank holds experts
  // [ep_rank * E / ep, (ep_rank + 1) * E / ep); tokens reach them by an all-to-all over the EP group.
  MoE(const ModelConfig& m, ParamStore& ps, const std::string& prefix, const ModelParallel& mp = {});
  struct Saved {
    Tensor input;                              // [T, d] (owned by the block)
    OwnedTensor logits, scores, idx, weights;  // [T, E], [T, E], [T, K] i32, [T, K]
    ops::DispatchPlan plan;
    OwnedTensor xs;  // [R, d] rows of the plan: dispatched inputs
    // Rows of this rank's experts, grouped by local expert (= xs when nothing is exchanged).
    OwnedTensor xe;       // [Rl, d] (empty when xs serves)
    OwnedTensor g, u, h;  // [Rl, F]
    // [Rl, 1] the combine weight of each expert row (f32). The experts apply it to their SwiGLU
    // output before the down projection, so the combine is a plain sum and its weight gradient comes
    // from the expert's own backward: the expert outputs are not kept.
    OwnedTensor we;
    // Rows [lo[e], hi[e]) of the plan go to expert e's owner (when `exchanged`); local expert j's
    // rows start at expert_offset[j] of xe (or of xs).
    ExpertExchange exchange;
    std::vector<int64_t> expert_offset;
    bool exchanged = false;
    SwiGLU::Saved shared;
    double balance_loss = 0;
    ops::Fp8Operand x_fp8;       // FP8 dispatch: the expert input rows (xe, or xs) as E4M3 + scales
    int64_t dispatch_bytes = 0;  // bytes this rank sent to other EP ranks in the dispatch
  };
  // y += MoE(x) (x all T rows, y the stream rows); the balance loss is in s.balance_loss.
  void forward(const ParamStore& ps, const Tensor& x, const Tensor& y, Saved& s,
               const StepContext& ctx) const;
  // dx (stream rows) overwritten from dy [T, d]; includes the balance-loss gradient (coefficient 1).
  void backward(const ParamStore& ps, const Saved& s, const Tensor& dy, const Tensor& dx,
                const StepContext& ctx) const;

  // Selective recompute of the expert and shared-expert SwiGLU products (recompute module swiglu);
  // recompute() rebuilds what was dropped.
  void drop_recomputable(Saved& s) const;
  void recompute(Saved& s, const StepContext& ctx) const;
  // Mixed precision: saved rows and products to bf16 storage (expert inputs as FP8 under FP8
  // dispatch) after the forward, back to f32 before the backward.
  static void store(Saved& s);
  static void restore(Saved& s);
  // Tokens routed to each expert in the last forward (kept assignments), for the bias update.
  static std::vector<int64_t> expert_load(const Saved& s);
  size_t bias_state() const { return bias_; }
  bool has_bias() const { return router_.use_bias; }
  const ops::RouterParams& router() const { return router_; }
  int64_t capacity(int64_t tokens) const;

 private:
  ModelParallel mp_;
  int64_t d_, E_, K_, F_, El_, e0_;  // El_ experts on this rank, the first is e0_
  double capacity_factor_, alpha_;
  ops::RouterParams router_;
  size_t gate_, bias_ = 0;
  std::vector<size_t> w_gate_, w_up_, w_down_;  // per expert
  std::unique_ptr<SwiGLU> shared_;
};

}  // namespace dsv3
