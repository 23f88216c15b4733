// MoE forward and backward. T tokens, E routed experts, K chosen per token, R kept (token, expert)
// rows after dispatch, F = expert_dim.
#include "model/moe.hpp"

#include <cmath>

namespace dsv3 {

MoE::MoE(const ModelConfig& m, ParamStore& ps, const std::string& p)
    : d_(m.d_model),
      E_(m.moe.num_experts),
      K_(m.moe.num_experts_per_token),
      F_(m.moe.expert_dim),
      capacity_factor_(m.moe.capacity_factor),
      alpha_(m.moe.seq_aux_alpha) {
  router_.num_experts = E_;
  router_.top_k = K_;
  router_.num_groups = m.moe.num_groups;
  router_.topk_groups = m.moe.topk_groups;
  router_.sigmoid = m.moe.score_func == "sigmoid";
  router_.use_bias = m.moe.aux_loss_free;
  router_.norm_topk = m.moe.norm_topk_prob;
  router_.route_scale = static_cast<float>(m.moe.route_scale);
  gate_ = ps.add(p + ".gate.weight", {E_, d_}, ParamInit::Normal);
  if (router_.use_bias) bias_ = ps.add_state(p + ".gate.e_score_correction_bias", {E_});
  for (int64_t e = 0; e < E_; ++e) {
    const std::string ep = p + ".experts." + std::to_string(e);
    w_gate_.push_back(ps.add(ep + ".gate_proj.weight", {F_, d_}, ParamInit::Normal, ParamGroup::Expert));
    w_up_.push_back(ps.add(ep + ".up_proj.weight", {F_, d_}, ParamInit::Normal, ParamGroup::Expert));
    w_down_.push_back(ps.add(ep + ".down_proj.weight", {d_, F_}, ParamInit::Normal, ParamGroup::Expert));
  }
  if (m.moe.num_shared_experts > 0)
    shared_ = std::make_unique<SwiGLU>(ps, p + ".shared_experts", d_, F_ * m.moe.num_shared_experts);
}

int64_t MoE::capacity(int64_t tokens) const {
  if (capacity_factor_ <= 0) return 0;
  return static_cast<int64_t>(std::ceil(capacity_factor_ * static_cast<double>(tokens * K_) / E_));
}

void MoE::forward(const ParamStore& ps, const Tensor& x, const Tensor& y, Saved& s,
                  const StepContext& ctx) const {
  const int64_t T = ctx.T();
  s.input = x;
  s.logits = act_out({T, E_}, "moe.router_logits");
  s.scores = act_out({T, E_}, "moe.scores");
  s.idx = OwnedTensor(DType::I32, {T, K_}, "moe.topk_idx");
  s.weights = act_out({T, K_}, "moe.topk_weights");
  ops::linear_forward(x, ps.value(gate_), s.logits);
  const Tensor bias = router_.use_bias ? ps.state(bias_).value : Tensor();
  ops::router_forward(router_, s.logits, bias, s.scores, s.idx, s.weights);
  s.balance_loss = alpha_ > 0 ? ops::seq_balance_loss_forward(s.scores, s.idx, ctx.B, alpha_) : 0.0;

  // Permute token copies by expert, run each expert on its rows, combine weighted.
  s.plan = ops::make_dispatch_plan(s.idx, E_, capacity(T));
  const int64_t R = s.plan.rows;
  s.xs = act_out({R, d_}, "moe.dispatched");
  s.g = act_out({R, F_}, "moe.g");
  s.u = act_out({R, F_}, "moe.u");
  s.h = act_out({R, F_}, "moe.h");
  s.ys = act_out({R, d_}, "moe.expert_out");
  ops::dispatch_forward(s.plan, x, s.xs);
  const int32_t* off = s.plan.offsets.i32();
  for (int64_t e = 0; e < E_; ++e) {
    const int64_t r0 = off[e], r1 = off[e + 1];
    if (r1 == r0) continue;
    const Tensor xe = s.xs.t.rows(r0, r1), ge = s.g.t.rows(r0, r1), ue = s.u.t.rows(r0, r1),
                 he = s.h.t.rows(r0, r1), ye = s.ys.t.rows(r0, r1);
    ops::linear_forward(xe, ps.value(w_gate_[e]), ge);
    ops::linear_forward(xe, ps.value(w_up_[e]), ue);
    ops::swiglu_forward(ge, ue, he);
    ops::linear_forward(he, ps.value(w_down_[e]), ye);
  }
  ops::combine_forward(s.plan, s.ys, s.weights, y, /*accumulate=*/true);
  if (shared_) shared_->forward(ps, x, y, /*accumulate=*/true, s.shared, ctx);
}

void MoE::backward(const ParamStore& ps, const Saved& s, const Tensor& dy, const Tensor& dx,
                   const StepContext& ctx) const {
  const int64_t T = ctx.T(), R = s.plan.rows;
  OwnedTensor dys = act_out({R, d_}, "moe.d_expert_out"), dw = act_out({T, K_}, "moe.d_topk_weights");
  ops::combine_backward(s.plan, s.ys, s.weights, dy, dys, dw);

  OwnedTensor dxs = act_out({R, d_}, "moe.d_dispatched");
  OwnedTensor dh = act_out({R, F_}, "moe.dh"), dg = act_out({R, F_}, "moe.dg"), du = act_out({R, F_}, "moe.du");
  const int32_t* off = s.plan.offsets.i32();
  for (int64_t e = 0; e < E_; ++e) {
    const int64_t r0 = off[e], r1 = off[e + 1];
    if (r1 == r0) continue;
    const Tensor dye = dys.t.rows(r0, r1), dhe = dh.t.rows(r0, r1), dge = dg.t.rows(r0, r1),
                 due = du.t.rows(r0, r1), dxe = dxs.t.rows(r0, r1), xe = s.xs.t.rows(r0, r1);
    ops::linear_backward_input(dye, ps.value(w_down_[e]), dhe);
    ops::linear_backward_weight(dye, s.h.t.rows(r0, r1), ps.grad(w_down_[e]));
    ops::swiglu_backward(s.g.t.rows(r0, r1), s.u.t.rows(r0, r1), dhe, dge, due);
    ops::linear_backward_input(dge, ps.value(w_gate_[e]), dxe);
    ops::linear_backward_input(due, ps.value(w_up_[e]), dxe, true);
    ops::linear_backward_weight(dge, xe, ps.grad(w_gate_[e]));
    ops::linear_backward_weight(due, xe, ps.grad(w_up_[e]));
  }
  ops::dispatch_backward(s.plan, dxs, dx);
  if (shared_) shared_->backward(ps, s.shared, dy, dx, /*accumulate=*/true);

  // Router: gradient through the gathered weights, plus the balance loss on the scores.
  OwnedTensor dscores;
  if (alpha_ > 0) {
    dscores = act({T, E_}, "moe.d_scores");
    ops::seq_balance_loss_backward(s.scores, s.idx, ctx.B, alpha_, ctx.grad_scale, dscores);
  }
  OwnedTensor dlogits = act_out({T, E_}, "moe.d_router_logits");
  ops::router_backward(router_, s.logits, s.scores, s.idx, dw, alpha_ > 0 ? dscores.t : Tensor(), dlogits);
  ops::linear_backward_input(dlogits, ps.value(gate_), dx, /*accumulate=*/true);
  ops::linear_backward_weight(dlogits, s.input, ps.grad(gate_));
}

void MoE::drop_recomputable(Saved& s) const {
  s.h = {};
  if (shared_) SwiGLU::drop_recomputable(s.shared);
}

void MoE::recompute(Saved& s) const {
  s.h = act_out(s.g.t.shape(), "moe.h");
  ops::swiglu_forward(s.g, s.u, s.h);
  if (shared_) SwiGLU::recompute(s.shared);
}

std::vector<int64_t> MoE::expert_load(const Saved& s) {
  std::vector<int64_t> load(static_cast<size_t>(s.plan.num_experts), 0);
  const int32_t* off = s.plan.offsets.i32();
  for (int64_t e = 0; e < s.plan.num_experts; ++e) load[static_cast<size_t>(e)] = off[e + 1] - off[e];
  return load;
}

}  // namespace dsv3
