// SwiGLU MLP forward and backward.
#include "model/mlp.hpp"

namespace dsv3 {

Recompute parse_recompute(const std::string& s) {
  if (s == "selective") return Recompute::Selective;
  if (s == "full") return Recompute::Full;
  return Recompute::None;
}

SwiGLU::SwiGLU(ParamStore& ps, const std::string& prefix, int64_t d, int64_t width, ParamGroup group)
    : d_(d), width_(width) {
  gate_ = ps.add(prefix + ".gate_proj.weight", {width, d}, ParamInit::Normal, group);
  up_ = ps.add(prefix + ".up_proj.weight", {width, d}, ParamInit::Normal, group);
  down_ = ps.add(prefix + ".down_proj.weight", {d, width}, ParamInit::Normal, group);
}

void SwiGLU::forward(const ParamStore& ps, const Tensor& x, const Tensor& y, bool accumulate, Saved& s,
                     const StepContext& ctx) const {
  const int64_t T = x.dim(0);
  s.input = x;
  s.g = act_out({T, width_}, "mlp.g");
  s.u = act_out({T, width_}, "mlp.u");
  s.h = act_out({T, width_}, "mlp.h");
  ops::linear_forward(x, ps.value(gate_), s.g);
  ops::linear_forward(x, ps.value(up_), s.u);
  ops::swiglu_forward(s.g, s.u, s.h);
  ops::linear_forward(s.h, ps.value(down_), y, accumulate);
  (void)ctx;
}

void SwiGLU::recompute(Saved& s) {
  s.h = act_out(s.g.t.shape(), "mlp.h");
  ops::swiglu_forward(s.g, s.u, s.h);
}

void SwiGLU::backward(const ParamStore& ps, const Saved& s, const Tensor& dy, const Tensor& dx,
                      bool accumulate) const {
  const int64_t T = dy.dim(0);
  OwnedTensor dh = act_out({T, width_}, "mlp.dh"), dg = act_out({T, width_}, "mlp.dg"),
              du = act_out({T, width_}, "mlp.du");
  ops::linear_backward_input(dy, ps.value(down_), dh);
  ops::linear_backward_weight(dy, s.h, ps.grad(down_));
  ops::swiglu_backward(s.g, s.u, dh, dg, du);
  ops::linear_backward_input(dg, ps.value(gate_), dx, accumulate);
  ops::linear_backward_input(du, ps.value(up_), dx, true);
  ops::linear_backward_weight(dg, s.input, ps.grad(gate_));
  ops::linear_backward_weight(du, s.input, ps.grad(up_));
}

}  // namespace dsv3
