// SwiGLU MLP: down(silu(gate(u)) * up(u)). Used for the dense FFN layers and the shared experts.
#pragma once

#include "model/common.hpp"
#include "model/params.hpp"

namespace dsv3 {

class SwiGLU {
 public:
  // Registers prefix.{gate_proj,up_proj,down_proj}.weight with width F. Under tensor parallelism
  // (dense FFN, shared experts) gate/up are column-parallel and down row-parallel: this rank holds
  // F / tp of the width, and the output and the input gradient are summed over the TP group.
  SwiGLU(ParamStore& ps, const std::string& prefix, int64_t d_model, int64_t width,
         ParamGroup group = ParamGroup::Dense, const ModelParallel& mp = {});
  struct Saved {
    OwnedTensor g, u, h;  // [T, F]
    Tensor input;         // [T, d] (the caller owns it)
  };
  // y (= or +=) MLP(x); x has all T rows. Under TP the output is summed over the group onto y's
  // stream rows (tp_reduce_rows), or, with reduce false, this rank's partial sum goes to y [T, d].
  void forward(const ParamStore& ps, const Tensor& x, const Tensor& y, bool accumulate, Saved& s,
               const StepContext& ctx, bool reduce = true) const;
  // dx (= or +=) from dy [T, d], reduced like the forward output; weight gradients accumulate.
  void backward(const ParamStore& ps, const Saved& s, const Tensor& dy, const Tensor& dx, bool accumulate,
                const StepContext& ctx, bool reduce = true) const;
  // Selective recompute: h = silu(g) * u is freed after the forward and rebuilt before the backward.
  static void drop_recomputable(Saved& s) { s.h = {}; }
  static void recompute(Saved& s, const StepContext& ctx);
  // Mixed precision: the saved products to bf16 storage after the forward, back to f32 before the
  // backward.
  static void store(Saved& s);
  static void restore(Saved& s);
  int64_t width() const { return width_; }

 private:
  size_t gate_, up_, down_;
  int64_t d_, width_;  // width_: this rank's part
  ModelParallel mp_;
};

}  // namespace dsv3
