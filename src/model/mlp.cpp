// SwiGLU MLP forward and backward.
#include "model/mlp.hpp"

namespace dsv3 {

Recompute parse_recompute(const std::string& s) {
  if (s == "selective") return Recompute::Selective;
  if (s == "full") return Recompute::Full;
  return Recompute::None;
}

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
  s.input = x;
  s.g = act_out({T, width_}, "mlp.g");
  s.u = act_out({T, width_}, "mlp.u");
  s.h = act_out({T, width_}, "mlp.h");
  ops::linear_forward(x, ps.value(gate_), s.g);
  ops::linear_forward(x, ps.value(up_), s.u);
  ops::swiglu_forward(s.g, s.u, s.h);
  (void)ctx;
  if (!mp_.tp || !reduce) {
    ops::linear_forward(s.h, ps.value(down_), y, accumulate);
    return;
  }
  OwnedTensor part = act_out({T, d_}, "mlp.down_partial");
  ops::linear_forward(s.h, ps.value(down_), part);
  tp_reduce_rows(mp_, part, y, accumulate);
}

void SwiGLU::recompute(Saved& s) {
  s.h = act_out(s.g.t.shape(), "mlp.h");
  ops::swiglu_forward(s.g, s.u, s.h);
}

void SwiGLU::backward(const ParamStore& ps, const Saved& s, const Tensor& dy, const Tensor& dx,
                      bool accumulate, bool reduce) const {
  const int64_t T = dy.dim(0);
  OwnedTensor dh = act_out({T, width_}, "mlp.dh"), dg = act_out({T, width_}, "mlp.dg"),
              du = act_out({T, width_}, "mlp.du");
  ops::linear_backward_input(dy, ps.value(down_), dh);
  ops::linear_backward_weight(dy, s.h, ps.grad(down_));
  ops::swiglu_backward(s.g, s.u, dh, dg, du);
  ops::linear_backward_weight(dg, s.input, ps.grad(gate_));
  ops::linear_backward_weight(du, s.input, ps.grad(up_));
  if (!mp_.tp || !reduce) {
    ops::linear_backward_input(dg, ps.value(gate_), dx, accumulate);
    ops::linear_backward_input(du, ps.value(up_), dx, true);
    return;
  }
  OwnedTensor part = act_out({T, d_}, "mlp.dx_partial");
  ops::linear_backward_input(dg, ps.value(gate_), part);
  ops::linear_backward_input(du, ps.value(up_), part, true);
  tp_reduce_rows(mp_, part, dx, accumulate);
}

}  // namespace dsv3
