// SwiGLU MLP forward and backward.
#include "model/mlp.hpp"

namespace dsv3 {

SwiGLU::SwiGLU(ParamStore& ps, const std::string& prefix, int64_t d, int64_t width, ParamGroup group,
               const ModelParallel& mp)
    : d_(d), width_(width / mp.tp_size), mp_(mp) {
  const int64_t tp = mp.tp_size, r = mp.tp_rank;
  gate_ = ps.add_split(prefix + ".gate_proj.weight", {width, d}, 0, tp, r, ParamInit::Normal, group);
  up_ = ps.add_split(prefix + ".up_proj.weight", {width, d}, 0, tp, r, ParamInit::Normal, group);
  down_ = ps.add_split(prefix + ".down_proj.weight", {d, width}, 1, tp, r, ParamInit::Normal, group);
}

void SwiGLU::forward(const ParamStore& ps, const Tensor& x, const Tensor& y, bool accumulate, Saved& s,
                     const StepContext& ctx, bool reduce) const {
  const int64_t T = x.dim(0);
  constexpr GemmKind kF8 = GemmKind::Fp8Ffn;  // FFN and expert projections: FP8 under fp8_modules "ffn"
  s.input = x;
  s.g = act_out({T, width_}, "mlp.g");
  s.u = act_out({T, width_}, "mlp.u");
  s.h = act_out({T, width_}, "mlp.h");
  linear_fwd(ctx, kF8, x, ps.compute(gate_), s.g);
  linear_fwd(ctx, kF8, x, ps.compute(up_), s.u);
  ops::swiglu_forward(s.g, s.u, s.h);
  round_act(ctx, s.h);
  StepContext f32 = ctx;
  f32.num.bf16 = false;  // partial sums are added in fp32 and rounded once (by the caller if !reduce)
  if (!mp_.tp || !reduce) {
    linear_fwd(reduce ? ctx : f32, kF8, s.h, ps.compute(down_), y, accumulate);
    return;
  }
  OwnedTensor part = act_out({T, d_}, "mlp.down_partial");
  linear_fwd(f32, kF8, s.h, ps.compute(down_), part);
  tp_reduce_rows(mp_, part, y, accumulate);
  round_act(ctx, y);
}

void SwiGLU::recompute(Saved& s, const StepContext& ctx) {
  if (!s.h.t.empty()) return;
  s.h = act_out(s.g.t.shape(), "mlp.h");
  ops::swiglu_forward(s.g, s.u, s.h);
  round_act(ctx, s.h);
}

void SwiGLU::backward(const ParamStore& ps, const Saved& s, const Tensor& dy, const Tensor& dx,
                      bool accumulate, const StepContext& ctx, bool reduce) const {
  const int64_t T = dy.dim(0);
  constexpr GemmKind kF8 = GemmKind::Fp8Ffn;
  OwnedTensor dh = act_out({T, width_}, "mlp.dh"), dg = act_out({T, width_}, "mlp.dg"),
              du = act_out({T, width_}, "mlp.du");
  linear_dgrad(ctx, kF8, dy, ps.compute(down_), dh);
  linear_wgrad(ctx, kF8, dy, s.h, ps.grad(down_));
  ops::swiglu_backward(s.g, s.u, dh, dg, du);
  round_act(ctx, dg), round_act(ctx, du);
  linear_wgrad(ctx, kF8, dg, s.input, ps.grad(gate_));
  linear_wgrad(ctx, kF8, du, s.input, ps.grad(up_));
  // dx (=/+=) dg . W_gate + du . W_up: both GEMMs into one fp32 sum, rounded once (by the caller
  // if !reduce).
  StepContext f32 = ctx;
  f32.num.bf16 = false;
  if (!mp_.tp || !reduce) {
    linear_dgrad(f32, kF8, dg, ps.compute(gate_), dx, accumulate);
    linear_dgrad(reduce ? ctx : f32, kF8, du, ps.compute(up_), dx, true);
    return;
  }
  OwnedTensor part = act_out({T, d_}, "mlp.dx_partial");
  linear_dgrad(f32, kF8, dg, ps.compute(gate_), part);
  linear_dgrad(f32, kF8, du, ps.compute(up_), part, true);
  tp_reduce_rows(mp_, part, dx, accumulate);
  round_act(ctx, dx);
}

void SwiGLU::store(Saved& s) {
  for (OwnedTensor* t : {&s.g, &s.u, &s.h}) store_bf16(*t);
}

void SwiGLU::restore(Saved& s) {
  for (OwnedTensor* t : {&s.g, &s.u, &s.h}) load_f32(*t);
}

}  // namespace dsv3
