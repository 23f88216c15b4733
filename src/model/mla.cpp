// MLA forward and backward. Shapes: T = B*S tokens, H heads, n = qk_nope_head_dim, R = qk_rope_head_dim,
// dv = v_head_dim, r_q = q_lora_rank, r_kv = d_latent.
#include "model/mla.hpp"

#include <cmath>

namespace dsv3 {

ops::RopeParams rope_params(const ModelConfig& m) {
  ops::RopeParams p;
  p.rope_dim = m.mla.qk_rope_head_dim;
  p.theta = m.rope.theta;
  p.yarn = m.yarn_active();
  p.factor = m.rope.factor;
  p.original_context_length = m.rope.original_context_length;
  p.beta_fast = m.rope.beta_fast;
  p.beta_slow = m.rope.beta_slow;
  return p;
}

float attention_scale(const ModelConfig& m) {
  double scale = 1.0 / std::sqrt(static_cast<double>(m.qk_head_dim()));
  if (m.yarn_active()) {
    const double ms = 0.1 * m.rope.mscale * std::log(m.rope.factor) + 1.0;
    scale *= ms * ms;
  }
  return static_cast<float>(scale);
}

MLA::MLA(const ModelConfig& m, ParamStore& ps, const std::string& p, const ModelParallel& mp)
    : mp_(mp),
      d_(m.d_model),
      H_(m.num_heads / mp.tp_size),
      n_(m.mla.qk_nope_head_dim),
      R_(m.mla.qk_rope_head_dim),
      dv_(m.mla.v_head_dim),
      rq_(m.mla.q_lora_rank),
      rkv_(m.mla.d_latent),
      eps_(static_cast<float>(m.norm_eps)) {
  const int64_t qk = n_ + R_, H = m.num_heads, tp = mp.tp_size, r = mp.tp_rank;
  if (rq_ > 0) {
    q_a_ = ps.add_replicated(p + ".q_a_proj.weight", {rq_, d_}, r, ParamInit::Normal);
    q_a_norm_ =
        ps.add_replicated(p + ".q_a_layernorm.weight", {rq_}, r, ParamInit::Ones, ParamGroup::Dense, false);
    q_b_ = ps.add_split(p + ".q_b_proj.weight", {H * qk, rq_}, 0, tp, r, ParamInit::Normal);
  } else {
    q_ = ps.add_split(p + ".q_proj.weight", {H * qk, d_}, 0, tp, r, ParamInit::Normal);
  }
  kv_a_ = ps.add_replicated(p + ".kv_a_proj_with_mqa.weight", {rkv_ + R_, d_}, r, ParamInit::Normal);
  kv_norm_ =
      ps.add_replicated(p + ".kv_a_layernorm.weight", {rkv_}, r, ParamInit::Ones, ParamGroup::Dense, false);
  kv_b_ = ps.add_split(p + ".kv_b_proj.weight", {H * (n_ + dv_), rkv_}, 0, tp, r, ParamInit::Normal);
  o_ = ps.add_split(p + ".o_proj.weight", {d_, H * dv_}, 1, tp, r, ParamInit::Normal);
}

void MLA::forward(const ParamStore& ps, const Tensor& xn, const Tensor& y, Saved& s,
                  const StepContext& ctx) const {
  const int64_t B = ctx.B, S = ctx.S, T = ctx.T();
  constexpr GemmKind kF8 = GemmKind::Fp8Attention;  // MLA projections: FP8 under fp8_modules "attention"
  s.xn = xn;
  // Query: [T, H*(n+R)], through the q latent when q_lora_rank > 0.
  if (rq_ > 0) {
    s.qa = act_out({T, rq_}, "mla.q_a");
    s.qa_n = act_out({T, rq_}, "mla.q_a_normed");
    s.qa_rstd = act_out({T}, "mla.q_a_rstd");
    linear_fwd(ctx, kF8, xn, ps.compute(q_a_), s.qa);
    ops::rmsnorm_forward(s.qa, ps.compute(q_a_norm_), eps_, s.qa_n, s.qa_rstd);
    round_act(ctx, s.qa_n);
  }
  queries(ps, s, ctx);

  // Key/value latent and the shared rotary key: kva [T, r_kv + R] = [c ; k_pe].
  s.kva = act_out({T, rkv_ + R_}, "mla.kv_a");
  linear_fwd(ctx, kF8, xn, ps.compute(kv_a_), s.kva);
  s.c = act_out({T, rkv_}, "mla.c_kv");
  s.c_rstd = act_out({T}, "mla.c_kv_rstd");
  ops::copy_columns(s.kva, 0, s.c);
  s.c_n = act_out({T, rkv_}, "mla.c_kv_normed");
  ops::rmsnorm_forward(s.c, ps.compute(kv_norm_), eps_, s.c_n, s.c_rstd);
  round_act(ctx, s.c_n);
  if (ctx.num.fp8_kv) {
    // The FP8 KV cache: the normed latent RMSNorm(c) as E4M3 codes with 1 x 128 tiles along
    // kv_lora_rank, the quantization kv_b_proj's FP8 Fprop applies to it anyway. The forward's keys
    // and values come from these codes, so the backward rebuilds the very keys the forward's attention
    // (and its log-sum-exp) used, and under FP8 Fprop the cache adds no rounding to the forward. The
    // latent itself stays in the kv_a output (bf16 storage) for the norm's backward.
    s.kv_fp8 = ops::fp8_quantize(s.c_n, /*blocks=*/false);
  }
  keys_values(ps, s, ctx);

  s.o = act_out({B, S, H_, dv_}, "mla.o");
  s.lse = act_out({B, H_, S}, "mla.lse");
  ops::attention_forward(s.q, s.k, s.v, ctx.attn_scale, s.o, s.lse);
  round_act(ctx, s.o);
  if (!mp_.tp) {
    linear_fwd(ctx, kF8, s.o.t.view({T, H_ * dv_}), ps.compute(o_), y, /*accumulate=*/true);
    return;
  }
  // Row-parallel o_proj: each rank's heads give a partial sum of the output (summed in fp32).
  OwnedTensor part = act_out({T, d_}, "mla.o_proj_partial");
  StepContext f32 = ctx;
  f32.num.bf16 = false;  // the partial stays unrounded; the sum is rounded once
  linear_fwd(f32, kF8, s.o.t.view({T, H_ * dv_}), ps.compute(o_), part);
  tp_reduce_rows(mp_, part, y, /*accumulate=*/true);
  round_act(ctx, y);
}

void MLA::queries(const ParamStore& ps, Saved& s, const StepContext& ctx) const {
  const int64_t B = ctx.B, S = ctx.S, T = ctx.T(), qk = n_ + R_;
  s.q = act_out({B, S, H_, qk}, "mla.q");
  const Tensor q2 = s.q.t.view({T, H_ * qk});
  if (rq_ > 0)
    linear_fwd(ctx, GemmKind::Fp8Attention, s.qa_n, ps.compute(q_b_), q2);
  else
    linear_fwd(ctx, GemmKind::Fp8Attention, s.xn, ps.compute(q_), q2);
  ops::rope_forward(s.q, ctx.rope_cos, ctx.rope_sin, n_);
  round_act(ctx, s.q);
}

void MLA::keys_values(const ParamStore& ps, Saved& s, const StepContext& ctx) const {
  const int64_t B = ctx.B, S = ctx.S, T = ctx.T(), qk = n_ + R_;
  OwnedTensor k_pe = act_out({B, S, 1, R_}, "mla.k_pe");
  ops::copy_columns(s.kva, rkv_, k_pe.t.view({T, R_}));
  ops::rope_forward(k_pe, ctx.rope_cos, ctx.rope_sin, 0);
  round_act(ctx, k_pe);
  // Per-head keys and values from the latent: kvb [T, H*(n+dv)] -> k [.., n+R], v [.., dv].
  OwnedTensor kvb = act_out({B, S, H_, n_ + dv_}, "mla.kv_b");
  const Tensor kvb2 = kvb.t.view({T, H_ * (n_ + dv_)});
  if (s.kv_fp8.codes.t.empty())
    linear_fwd(ctx, GemmKind::Fp8Attention, s.c_n, ps.compute(kv_b_), kvb2);
  else
    linear_fwd(ctx, GemmKind::Fp8Attention, s.kv_fp8, ps.compute(kv_b_), kvb2);
  s.k = act_out({B, S, H_, qk}, "mla.k");
  s.v = act_out({B, S, H_, dv_}, "mla.v");
  ops::mla_assemble_kv(kvb, k_pe.t.view({B, S, R_}), n_, s.k, s.v);
}

void MLA::store(Saved& s, const StepContext& ctx) {
  if (ctx.num.fp8_kv && !s.kv_fp8.codes.t.empty()) s.c = {}, s.c_n = {}, s.k = {}, s.v = {};
  for (OwnedTensor* t : {&s.qa, &s.qa_n, &s.kva, &s.c, &s.c_n, &s.q, &s.k, &s.v, &s.o}) store_bf16(*t);
}

void MLA::restore(const ParamStore& ps, Saved& s, const StepContext& ctx) const {
  for (OwnedTensor* t : {&s.qa, &s.qa_n, &s.kva, &s.c, &s.c_n, &s.q, &s.k, &s.v, &s.o}) load_f32(*t);
  if (s.kv_fp8.codes.t.empty()) return;
  // The latent from the kv_a output; the backward's keys and values from the cached codes of
  // RMSNorm(c) and the rotary key columns, as in the forward.
  const int64_t T = ctx.T();
  s.c = act_out({T, rkv_}, "mla.c_kv");
  ops::copy_columns(s.kva, 0, s.c);
  s.c_n = act_out({T, rkv_}, "mla.c_kv_normed");
  ops::fp8_dequantize(s.kv_fp8, s.c_n);
  round_act(ctx, s.c_n);
  keys_values(ps, s, ctx);
  s.kv_fp8 = {};
}

void MLA::apply_fp8_kv(Saved& s, const StepContext& ctx) {
  if (s.kv_fp8.codes.t.empty()) return;
  ops::fp8_dequantize(s.kv_fp8, s.c_n);
  round_act(ctx, s.c_n);
  s.kv_fp8 = {};
}

void MLA::drop_recomputable(Saved& s, const RecomputeSet& r) {
  if (r.norms) s.qa_n = {}, s.c_n = {};
  if (r.mla_up_proj) s.q = {}, s.k = {}, s.v = {};
}

void MLA::recompute(const ParamStore& ps, Saved& s, const StepContext& ctx) const {
  const int64_t T = ctx.T();
  if (rq_ > 0 && s.qa_n.t.empty()) {
    s.qa_n = act_out({T, rq_}, "mla.q_a_normed");
    ops::rmsnorm_forward(s.qa, ps.compute(q_a_norm_), eps_, s.qa_n, s.qa_rstd);
    round_act(ctx, s.qa_n);
  }
  if (s.c_n.t.empty()) {
    s.c_n = act_out({T, rkv_}, "mla.c_kv_normed");
    ops::rmsnorm_forward(s.c, ps.compute(kv_norm_), eps_, s.c_n, s.c_rstd);
    round_act(ctx, s.c_n);
  }
  if (s.q.t.empty()) queries(ps, s, ctx);
  if (s.k.t.empty()) keys_values(ps, s, ctx);
}

void MLA::backward(const ParamStore& ps, const Saved& s, const Tensor& dy, const Tensor& dxn,
                   const StepContext& ctx) const {
  const int64_t B = ctx.B, S = ctx.S, T = ctx.T(), qk = n_ + R_;
  constexpr GemmKind kF8 = GemmKind::Fp8Attention;
  OwnedTensor d_o = act_out({B, S, H_, dv_}, "mla.d_o");
  linear_dgrad(ctx, kF8, dy, ps.compute(o_), d_o.t.view({T, H_ * dv_}));
  linear_wgrad(ctx, kF8, dy, s.o.t.view({T, H_ * dv_}), ps.grad(o_));

  OwnedTensor dq = act_out({B, S, H_, qk}, "mla.dq"), dk = act_out({B, S, H_, qk}, "mla.dk"),
              dvv = act_out({B, S, H_, dv_}, "mla.dv");
  ops::attention_backward(s.q, s.k, s.v, s.o, s.lse, d_o, ctx.attn_scale, dq, dk, dvv);
  for (const OwnedTensor* t : {&dq, &dk, &dvv}) round_act(ctx, *t);

  OwnedTensor dkvb = act_out({B, S, H_, n_ + dv_}, "mla.dkv_b"), dk_pe = act_out({B, S, 1, R_}, "mla.dk_pe");
  ops::mla_assemble_kv_backward(dk, dvv, n_, dkvb, dk_pe.t.view({B, S, R_}));
  ops::rope_backward(dk_pe, ctx.rope_cos, ctx.rope_sin, 0);
  ops::rope_backward(dq, ctx.rope_cos, ctx.rope_sin, n_);
  round_act(ctx, dk_pe), round_act(ctx, dq);

  // Latent path: kv_b, kv norm, then the kv_a columns [c ; k_pe]. Under TP the partial gradients of
  // the replicated latent are summed in fp32 and rounded once.
  StepContext part_ctx = ctx;
  if (mp_.tp) part_ctx.num.bf16 = false;
  OwnedTensor dc_n = act_out({T, rkv_}, "mla.dc_kv_normed"), dc = act_out({T, rkv_}, "mla.dc_kv");
  const Tensor dkvb2 = dkvb.t.view({T, H_ * (n_ + dv_)});
  linear_dgrad(part_ctx, kF8, dkvb2, ps.compute(kv_b_), dc_n);
  linear_wgrad(ctx, kF8, dkvb2, s.c_n, ps.grad(kv_b_));
  // Column-parallel inputs: the latent and the shared rotary key gather contributions of all heads.
  tp_allreduce(mp_, dc_n);
  tp_allreduce(mp_, dk_pe);
  round_act(ctx, dc_n), round_act(ctx, dk_pe);
  ops::rmsnorm_backward(s.c, ps.compute(kv_norm_), s.c_rstd, dc_n, dc, ps.grad(kv_norm_));
  round_act(ctx, dc);
  OwnedTensor dkva = act_out({T, rkv_ + R_}, "mla.dkv_a");
  ops::copy_columns_backward(dc, 0, dkva);
  ops::copy_columns_backward(dk_pe.t.view({T, R_}), rkv_, dkva);
  linear_dgrad(ctx, kF8, dkva, ps.compute(kv_a_), dxn);
  linear_wgrad(ctx, kF8, dkva, s.xn, ps.grad(kv_a_));

  // Query path.
  const Tensor dq2 = dq.t.view({T, H_ * qk});
  if (rq_ > 0) {
    OwnedTensor dqa_n = act_out({T, rq_}, "mla.dq_a_normed"), dqa = act_out({T, rq_}, "mla.dq_a");
    linear_dgrad(part_ctx, kF8, dq2, ps.compute(q_b_), dqa_n);
    linear_wgrad(ctx, kF8, dq2, s.qa_n, ps.grad(q_b_));
    tp_allreduce(mp_, dqa_n);
    round_act(ctx, dqa_n);
    ops::rmsnorm_backward(s.qa, ps.compute(q_a_norm_), s.qa_rstd, dqa_n, dqa, ps.grad(q_a_norm_));
    round_act(ctx, dqa);
    linear_dgrad(ctx, kF8, dqa, ps.compute(q_a_), dxn, /*accumulate=*/true);
    linear_wgrad(ctx, kF8, dqa, s.xn, ps.grad(q_a_));
  } else if (!mp_.tp) {
    linear_dgrad(ctx, kF8, dq2, ps.compute(q_), dxn, /*accumulate=*/true);
    linear_wgrad(ctx, kF8, dq2, s.xn, ps.grad(q_));
  } else {
    OwnedTensor part = act_out({T, d_}, "mla.dxn_q_partial");
    linear_dgrad(part_ctx, kF8, dq2, ps.compute(q_), part);
    linear_wgrad(ctx, kF8, dq2, s.xn, ps.grad(q_));
    tp_allreduce(mp_, part);
    ops::add_inplace(dxn, part);
    round_act(ctx, dxn);
  }
}

}  // namespace dsv3
