// MoE forward and backward. T tokens, E routed experts (El of them on this rank), K chosen per token,
// R kept (token, expert) rows after dispatch, F = expert_dim.
//
// Parallel path: every rank routes all T tokens of its micro-batch (the plan, capacity included, is the
// single-rank one). Tensor-parallel peers hold the same tokens, so each sends only the rows of its
// token slice [owned_begin, owned_end); the rows of one expert are in token order, so that slice is
// the contiguous range [lo[e], hi[e]). An all-to-all over the EP group carries rows to the experts'
// owners and the outputs back; the combined output (non-zero only on owned tokens) is summed over
// the TP group. The backward runs the same exchange on the gradients.
#include "model/moe.hpp"

#include <algorithm>
#include <cmath>

#include "parallel/comm.hpp"

namespace dsv3 {

MoE::MoE(const ModelConfig& m, ParamStore& ps, const std::string& p, const ModelParallel& mp)
    : mp_(mp),
      d_(m.d_model),
      E_(m.moe.num_experts),
      K_(m.moe.num_experts_per_token),
      F_(m.moe.expert_dim),
      El_(m.moe.num_experts / mp.ep_size),
      e0_(mp.ep_rank * (m.moe.num_experts / mp.ep_size)),
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
  gate_ = ps.add_replicated(p + ".gate.weight", {E_, d_}, mp.tp_rank, ParamInit::Normal);
  if (router_.use_bias) bias_ = ps.add_state(p + ".gate.e_score_correction_bias", {E_});
  for (int64_t e = e0_; e < e0_ + El_; ++e) {
    const std::string ep = p + ".experts." + std::to_string(e);
    w_gate_.push_back(ps.add(ep + ".gate_proj.weight", {F_, d_}, ParamInit::Normal, ParamGroup::Expert));
    w_up_.push_back(ps.add(ep + ".up_proj.weight", {F_, d_}, ParamInit::Normal, ParamGroup::Expert));
    w_down_.push_back(ps.add(ep + ".down_proj.weight", {d_, F_}, ParamInit::Normal, ParamGroup::Expert));
  }
  if (m.moe.num_shared_experts > 0)
    shared_ = std::make_unique<SwiGLU>(ps, p + ".shared_experts", d_, F_ * m.moe.num_shared_experts,
                                       ParamGroup::Dense, mp);
}

int64_t MoE::capacity(int64_t tokens) const {
  if (capacity_factor_ <= 0) return 0;
  return static_cast<int64_t>(std::ceil(capacity_factor_ * static_cast<double>(tokens * K_) / E_));
}

void MoE::forward(const ParamStore& ps, const Tensor& x, const Tensor& y, Saved& s,
                  const StepContext& ctx) const {
  const int64_t T = ctx.T();
  constexpr GemmKind kF8 = GemmKind::Fp8Ffn;  // routed and shared experts: FP8 under fp8_modules "ffn"
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
  ops::dispatch_forward(s.plan, x, s.xs);
  // FP8 dispatch: the rows become E4M3 with 1 x 128 tile scales before they travel; the experts see
  // their dequantized values on every layout (with or without an exchange).
  ops::Fp8Operand xs_fp8;
  if (ctx.num.fp8_dispatch) xs_fp8 = ops::fp8_quantize(s.xs, /*blocks=*/false);
  s.dispatch_bytes = 0;
  const int32_t* off = s.plan.offsets.i32();
  s.exchanged = mp_.ep != nullptr || mp_.tp != nullptr;
  if (s.exchanged) {
    // This rank's token slice: the rows of an expert are in token order, so a contiguous range.
    const int64_t a = mp_.owned_begin(T), b = mp_.owned_end(T);
    const int32_t* slot = s.plan.slot_of_row.i32();
    std::vector<int64_t> lo(static_cast<size_t>(E_)), hi(static_cast<size_t>(E_));
    for (int64_t e = 0; e < E_; ++e) {
      int64_t r = off[e];
      while (r < off[e + 1] && slot[r] / K_ < a) ++r;
      lo[e] = r;
      while (r < off[e + 1] && slot[r] / K_ < b) ++r;
      hi[e] = r;
    }
    s.exchange = ExpertExchange(mp_, E_, d_, std::move(lo), std::move(hi));
    if (ctx.num.fp8_dispatch) {
      s.x_fp8 = s.exchange.dispatch_fp8(xs_fp8, &s.dispatch_bytes);
      s.xe = act_out(s.x_fp8.codes.t.shape(), "moe.expert_rows");
      ops::fp8_dequantize(s.x_fp8, s.xe);
    } else {
      s.xe = s.exchange.dispatch(s.xs, &s.dispatch_bytes);
    }
    s.xs = {};  // the backward reads the rows that arrived (xe), not the sent ones
    s.expert_offset = s.exchange.expert_offset();
  } else {
    s.expert_offset.assign(off + e0_, off + e0_ + El_ + 1);
    if (ctx.num.fp8_dispatch) {
      ops::fp8_dequantize(xs_fp8, s.xs);
      s.x_fp8 = std::move(xs_fp8);
    }
  }
  const Tensor xin = s.exchanged ? s.xe.t : s.xs.t;
  const int64_t Rl = std::max<int64_t>(s.expert_offset[El_] - s.expert_offset[0], 1);
  // The combine weight of every plan row, carried to the expert that runs the row.
  OwnedTensor wrow = act({std::max<int64_t>(R, 1), 1}, "moe.row_weights");
  {
    const int32_t* slot = s.plan.slot_of_row.i32();
    const float* w = s.weights.t.f32();
    float* wr = wrow.t.f32();
    for (int64_t r = 0; r < R; ++r) wr[r] = w[slot[r]];
  }
  if (s.exchanged)
    s.we = s.exchange.with_width(1).dispatch(wrow.t, &s.dispatch_bytes);
  else
    s.we = std::move(wrow);
  s.g = act_out({Rl, F_}, "moe.g");
  s.u = act_out({Rl, F_}, "moe.u");
  s.h = act_out({Rl, F_}, "moe.h");
  OwnedTensor hw = act_out({Rl, F_}, "moe.h_weighted");
  OwnedTensor ye = act_out({Rl, d_}, "moe.expert_rows_out");
  const int64_t base = s.expert_offset[0];
  for (int64_t j = 0; j < El_; ++j) {
    const int64_t r0 = s.expert_offset[j], r1 = s.expert_offset[j + 1];
    if (r1 == r0) continue;
    const int64_t l0 = r0 - base, l1 = r1 - base;
    const Tensor xe = xin.rows(r0, r1), ge = s.g.t.rows(l0, l1), ue = s.u.t.rows(l0, l1),
                 he = s.h.t.rows(l0, l1), hwe = hw.t.rows(l0, l1), yo = ye.t.rows(l0, l1);
    linear_fwd(ctx, kF8, xe, ps.compute(w_gate_[j]), ge);
    linear_fwd(ctx, kF8, xe, ps.compute(w_up_[j]), ue);
    ops::swiglu_forward(ge, ue, he);
    round_act(ctx, he);
    ops::scale_rows_forward(he, s.we.t.rows(l0, l1).view({l1 - l0}), hwe);
    round_act(ctx, hwe);
    linear_fwd(ctx, kF8, hwe, ps.compute(w_down_[j]), yo);
  }
  // The combine sums the (already weighted) expert outputs of each token.
  OwnedTensor ones(DType::F32, {T, K_}, "moe.unit_weights");
  {
    float* o = ones.t.f32();
    for (int64_t i = 0; i < T * K_; ++i) o[i] = 1.0f;
  }
  OwnedTensor ys;
  if (!s.exchanged) {
    ys = std::move(ye);
  } else {
    ys = act({std::max<int64_t>(R, 1), d_}, "moe.expert_out");  // zero outside the owned rows
    s.exchange.combine(ye, ys);
    if (mp_.tp) {  // this rank's tokens and shared-expert slice; one reduction for both
      OwnedTensor part = act_out({T, d_}, "moe.partial");
      ops::combine_forward(s.plan, ys.t.rows(0, R), ones, part);
      if (shared_) shared_->forward(ps, x, part, /*accumulate=*/true, s.shared, ctx, /*reduce=*/false);
      tp_reduce_rows(mp_, part, y, /*accumulate=*/true);
      round_act(ctx, y);
      return;
    }
  }
  ops::combine_forward(s.plan, ys.t.rows(0, R), ones, y, /*accumulate=*/true);
  round_act(ctx, y);
  if (shared_) shared_->forward(ps, x, y, /*accumulate=*/true, s.shared, ctx);
}

void MoE::backward(const ParamStore& ps, const Saved& s, const Tensor& dy, const Tensor& dx,
                   const StepContext& ctx) const {
  const int64_t T = ctx.T(), R = s.plan.rows;
  constexpr GemmKind kF8 = GemmKind::Fp8Ffn;  // routed and shared experts: FP8 under fp8_modules "ffn"
  StepContext f32 = ctx;
  f32.num.bf16 = false;  // partial sums stay unrounded
  // Every expert row receives its token's output gradient unweighted (the weight is inside the expert).
  OwnedTensor dys = act_out({std::max<int64_t>(R, 1), d_}, "moe.d_expert_out");
  ops::dispatch_forward(s.plan, dy, dys.t.rows(0, R));

  const Tensor xin = s.exchanged ? s.xe.t : s.xs.t;
  OwnedTensor dye_owned;
  Tensor dye = dys.t;
  if (s.exchanged) {  // the gradients travel like the rows did; the plan-ordered copy is not needed after
    dye_owned = s.exchange.dispatch(dys.t);
    dye = dye_owned.t;
    dys = {};
  }
  const int64_t base = s.expert_offset[0];
  const int64_t Rl = std::max<int64_t>(s.expert_offset[El_] - base, 1);
  OwnedTensor dxe = act_out({s.exchanged ? Rl : std::max<int64_t>(R, 1), d_}, "moe.d_expert_rows");
  OwnedTensor dhw = act_out({Rl, F_}, "moe.dh_weighted"), hw = act_out({Rl, F_}, "moe.h_weighted"),
              dh = act_out({Rl, F_}, "moe.dh"), dg = act_out({Rl, F_}, "moe.dg"),
              du = act_out({Rl, F_}, "moe.du");
  OwnedTensor dwe = act({Rl, 1}, "moe.d_row_weights");
  for (int64_t j = 0; j < El_; ++j) {
    const int64_t r0 = s.expert_offset[j], r1 = s.expert_offset[j + 1];
    if (r1 == r0) continue;
    const int64_t l0 = r0 - base, l1 = r1 - base;
    const Tensor dyo = dye.rows(r0, r1), dhwe = dhw.t.rows(l0, l1), hwe = hw.t.rows(l0, l1),
                 dhe = dh.t.rows(l0, l1), dge = dg.t.rows(l0, l1), due = du.t.rows(l0, l1),
                 dxo = dxe.t.rows(r0, r1), xe = xin.rows(r0, r1), he = s.h.t.rows(l0, l1),
                 we = s.we.t.rows(l0, l1).view({l1 - l0});
    ops::scale_rows_forward(he, we, hwe);  // the down projection's input, as the forward rounded it
    round_act(ctx, hwe);
    linear_dgrad(ctx, kF8, dyo, ps.compute(w_down_[j]), dhwe);
    linear_wgrad(ctx, kF8, dyo, hwe, ps.grad(w_down_[j]));
    ops::scale_rows_backward(he, we, dhwe, dhe, dwe.t.rows(l0, l1).view({l1 - l0}));
    round_act(ctx, dhe);
    ops::swiglu_backward(s.g.t.rows(l0, l1), s.u.t.rows(l0, l1), dhe, dge, due);
    round_act(ctx, dge), round_act(ctx, due);
    linear_dgrad(f32, kF8, dge, ps.compute(w_gate_[j]), dxo);  // one fp32 sum of both, rounded once
    linear_dgrad(ctx, kF8, due, ps.compute(w_up_[j]), dxo, true);
    linear_wgrad(ctx, kF8, dge, xe, ps.grad(w_gate_[j]));
    linear_wgrad(ctx, kF8, due, xe, ps.grad(w_up_[j]));
  }
  // The experts' temporaries go before the combine's buffers come (the block's backward peak).
  dhw = {}, hw = {}, dh = {}, dg = {}, du = {}, dye_owned = {}, dys = {};
  // The combine weights' gradients go back to the token's slots (0 for dropped slots).
  OwnedTensor dw = act({T, K_}, "moe.d_topk_weights");
  {
    OwnedTensor dwr_owned;
    Tensor dwr = dwe.t;
    if (s.exchanged) {
      dwr_owned = act({std::max<int64_t>(R, 1), 1}, "moe.d_plan_row_weights");  // zero outside the owned rows
      s.exchange.with_width(1).combine(dwe, dwr_owned);
      dwr = dwr_owned.t;
    }
    const int32_t* slot = s.plan.slot_of_row.i32();
    const float* src = dwr.f32();
    float* d = dw.t.f32();
    for (int64_t r = 0; r < R; ++r) d[slot[r]] = src[r];
  }
  // Under TP, dxp collects this rank's partial input gradient (its tokens' routed rows, its slice of
  // the shared experts, the router's rows of its tokens) and one reduction sums it.
  OwnedTensor partial;
  if (mp_.tp) partial = act_out({T, d_}, "moe.d_input_partial");
  const Tensor dxp = mp_.tp ? partial.t : dx;
  // The input gradient sums the routed rows, the shared experts and the router in fp32; it is
  // rounded once at the end.
  if (!s.exchanged) {
    ops::dispatch_backward(s.plan, dxe.t.rows(0, R), dxp);
  } else {
    OwnedTensor dxs = act({std::max<int64_t>(R, 1), d_}, "moe.d_dispatched");  // zero outside the owned rows
    s.exchange.combine(dxe, dxs);
    ops::dispatch_backward(s.plan, dxs.t.rows(0, R), dxp);
    tp_allreduce(mp_, dw);  // each TP rank has the weight gradients of its own tokens
  }
  if (shared_) shared_->backward(ps, s.shared, dy, dxp, /*accumulate=*/true, f32, /*reduce=*/false);

  // Router: gradient through the gathered weights, plus the balance loss on the scores.
  OwnedTensor dscores;
  if (alpha_ > 0) {
    dscores = act({T, E_}, "moe.d_scores");
    ops::seq_balance_loss_backward(s.scores, s.idx, ctx.B, alpha_, ctx.grad_scale, dscores);
  }
  OwnedTensor dlogits = act_out({T, E_}, "moe.d_router_logits");
  ops::router_backward(router_, s.logits, s.scores, s.idx, dw, alpha_ > 0 ? dscores.t : Tensor(), dlogits);
  // The router runs in fp32 on the master gate weights.
  ops::linear_backward_weight(dlogits, s.input, ps.grad(gate_));
  if (!mp_.tp) {
    ops::linear_backward_input(dlogits, ps.value(gate_), dx, /*accumulate=*/true);
    round_act(ctx, dx);
    return;
  }
  const int64_t a = mp_.owned_begin(T), b = mp_.owned_end(T);
  ops::linear_backward_input(dlogits.t.rows(a, b), ps.value(gate_), dxp.rows(a, b), /*accumulate=*/true);
  tp_reduce_rows(mp_, dxp, dx, /*accumulate=*/false);
  round_act(ctx, dx);
}

void MoE::drop_recomputable(Saved& s) const {
  s.h = {};
  if (shared_) SwiGLU::drop_recomputable(s.shared);
}

void MoE::recompute(Saved& s, const StepContext& ctx) const {
  if (s.h.t.empty()) {
    s.h = act_out(s.g.t.shape(), "moe.h");
    ops::swiglu_forward(s.g, s.u, s.h);
    round_act(ctx, s.h);
  }
  if (shared_) SwiGLU::recompute(s.shared, ctx);
}

void MoE::store(Saved& s) {
  // Under FP8 dispatch the expert input rows are kept as their FP8 codes and scales.
  if (!s.x_fp8.codes.t.empty()) (s.exchanged ? s.xe : s.xs) = {};
  for (OwnedTensor* t : {&s.xs, &s.xe, &s.g, &s.u, &s.h}) store_bf16(*t);  // the weights stay f32
  SwiGLU::store(s.shared);
}

void MoE::restore(Saved& s) {
  for (OwnedTensor* t : {&s.xs, &s.xe, &s.g, &s.u, &s.h}) load_f32(*t);
  SwiGLU::restore(s.shared);
  if (s.x_fp8.codes.t.empty()) return;
  OwnedTensor& rows = s.exchanged ? s.xe : s.xs;
  if (!rows.t.empty()) return;  // not stored yet
  rows = act_out(s.x_fp8.codes.t.shape(), "moe.expert_rows");
  ops::fp8_dequantize(s.x_fp8, rows);
}

std::vector<int64_t> MoE::expert_load(const Saved& s) {
  std::vector<int64_t> load(static_cast<size_t>(s.plan.num_experts), 0);
  const int32_t* off = s.plan.offsets.i32();
  for (int64_t e = 0; e < s.plan.num_experts; ++e) load[static_cast<size_t>(e)] = off[e + 1] - off[e];
  return load;
}

}  // namespace dsv3
