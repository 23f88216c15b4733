// Transformer block forward and backward.
#include "model/block.hpp"

#include <cstring>

namespace dsv3 {

void Block::Saved::clear() {
  xn = {}, xn_rstd = {}, xn_all = {}, hn_all = {}, attn = {}, h = {}, hn = {}, hn_rstd = {}, mlp = {},
  moe = {};
  filled = false;
  trimmed = false;
  stored = false;
}

Block::Block(const ModelConfig& m, ParamStore& ps, int64_t layer, bool moe, const ModelParallel& mp)
    : layer_(layer),
      d_(m.d_model),
      eps_(static_cast<float>(m.norm_eps)),
      mp_(mp),
      norm_in_(ps.add_replicated("model.layers." + std::to_string(layer) + ".input_layernorm.weight",
                                 {m.d_model}, mp.tp_rank, ParamInit::Ones, ParamGroup::Dense, false)),
      norm_post_(
          ps.add_replicated("model.layers." + std::to_string(layer) + ".post_attention_layernorm.weight",
                            {m.d_model}, mp.tp_rank, ParamInit::Ones, ParamGroup::Dense, false)),
      attn_(m, ps, "model.layers." + std::to_string(layer) + ".self_attn", mp) {
  const std::string p = "model.layers." + std::to_string(layer) + ".mlp";
  if (moe)
    moe_ = std::make_unique<MoE>(m, ps, p, mp);
  else
    mlp_ = std::make_unique<SwiGLU>(ps, p, m.d_model, m.ffn_dim, ParamGroup::Dense, mp);
}

void Block::forward(const ParamStore& ps, const Tensor& x, const Tensor& out, Saved& s,
                    const StepContext& ctx) const {
  const int64_t rows = x.dim(0);
  s.x = x;
  s.xn = act_out({rows, d_}, "block.xn");
  s.xn_rstd = act_out({rows}, "block.xn_rstd");
  ops::rmsnorm_forward(x, ps.compute(norm_in_), eps_, s.xn, s.xn_rstd);
  round_act(ctx, s.xn);
  s.h = act_out({rows, d_}, "block.h");
  std::memcpy(s.h.t.data(), x.data(), x.bytes());  // residual
  attn_.forward(ps, tp_gather_rows(mp_, s.xn, s.xn_all, "block.xn_all"), s.h, s.attn, ctx);
  if (mp_.sp) s.xn = {};  // the gathered rows are what the backward reads
  s.hn = act_out({rows, d_}, "block.hn");
  s.hn_rstd = act_out({rows}, "block.hn_rstd");
  ops::rmsnorm_forward(s.h, ps.compute(norm_post_), eps_, s.hn, s.hn_rstd);
  round_act(ctx, s.hn);
  std::memcpy(out.data(), s.h.t.data(), out.bytes());  // residual
  const Tensor hin = tp_gather_rows(mp_, s.hn, s.hn_all, "block.hn_all");
  if (mp_.sp) s.hn = {};
  if (moe_) {
    moe_->forward(ps, hin, out, s.moe, ctx);
    s.balance_loss = s.moe.balance_loss;
    s.dispatch_bytes = s.moe.dispatch_bytes;
    s.expert_load = MoE::expert_load(s.moe);
  } else {
    mlp_->forward(ps, hin, out, /*accumulate=*/true, s.mlp, ctx);
  }
  s.filled = true;
  const RecomputeSet& r = ctx.recompute;
  if (!ctx.training || r.full) {
    s.clear();
  } else if (r.any()) {
    // Selective: drop what the chosen modules rebuild from the kept inputs and statistics.
    if (r.norms) s.xn = {}, s.xn_all = {}, s.hn = {}, s.hn_all = {};  // their rstd stays
    MLA::drop_recomputable(s.attn, r);
    if (r.swiglu) {
      if (moe_)
        moe_->drop_recomputable(s.moe);
      else
        SwiGLU::drop_recomputable(s.mlp);
    }
    s.trimmed = true;
  }
  if (!ctx.training || !ctx.num.bf16 || !s.filled) return;
  if (ctx.store_saved) {
    store(s, ctx);
  } else if (ctx.num.fp8_kv) {
    // A full recompute's forward, just before the backward: the saved activations hold bf16 values
    // already and the FP8 dispatch rows their codes' values, so a store and restore would give them
    // back unchanged; only the normed KV latent takes the FP8 cache's values.
    MLA::apply_fp8_kv(s.attn, ctx);
  }
}

void Block::store(Saved& s, const StepContext& ctx) const {
  for (OwnedTensor* t : {&s.xn, &s.xn_all, &s.h, &s.hn, &s.hn_all}) store_bf16(*t);
  MLA::store(s.attn, ctx);
  if (moe_)
    MoE::store(s.moe);
  else
    SwiGLU::store(s.mlp);
  s.stored = true;
}

void Block::restore(const ParamStore& ps, Saved& s, const StepContext& ctx) const {
  for (OwnedTensor* t : {&s.xn, &s.xn_all, &s.h, &s.hn, &s.hn_all}) load_f32(*t);
  s.attn.xn = mp_.sp ? s.xn_all.t : s.xn.t;
  attn_.restore(ps, s.attn, ctx);
  const Tensor hin = mp_.sp ? s.hn_all.t : s.hn.t;
  if (moe_) {
    MoE::restore(s.moe);
    s.moe.input = hin;
    s.moe.shared.input = hin;
  } else {
    SwiGLU::restore(s.mlp);
    s.mlp.input = hin;
  }
  s.stored = false;
}

void Block::restore_selective(const ParamStore& ps, Saved& s, const StepContext& ctx) const {
  // Rebuilds, with the forward's own ops, whatever the recompute set dropped.
  const int64_t rows = s.x.dim(0);
  if ((mp_.sp ? s.xn_all : s.xn).t.empty()) {
    s.xn = act_out({rows, d_}, "block.xn");
    ops::rmsnorm_forward(s.x, ps.compute(norm_in_), eps_, s.xn, s.xn_rstd);
    round_act(ctx, s.xn);
    s.attn.xn = tp_gather_rows(mp_, s.xn, s.xn_all, "block.xn_all");
  }
  if ((mp_.sp ? s.hn_all : s.hn).t.empty()) {
    s.hn = act_out({rows, d_}, "block.hn");
    ops::rmsnorm_forward(s.h, ps.compute(norm_post_), eps_, s.hn, s.hn_rstd);
    round_act(ctx, s.hn);
    const Tensor hin = tp_gather_rows(mp_, s.hn, s.hn_all, "block.hn_all");
    if (moe_)
      s.moe.input = hin, s.moe.shared.input = hin;
    else
      s.mlp.input = hin;
  }
  attn_.recompute(ps, s.attn, ctx);
  if (moe_)
    moe_->recompute(s.moe, ctx);
  else
    SwiGLU::recompute(s.mlp, ctx);
  s.trimmed = false;
}

void Block::backward(const ParamStore& ps, Saved& s, const Tensor& dout, const Tensor& dx,
                     const StepContext& ctx) const {
  if (!s.filled) {  // full recompute: rebuild the saved activations from the block input
    OwnedTensor scratch = act_out({s.x.dim(0), d_}, "block.recompute_out");
    StepContext again = ctx;
    again.recompute = RecomputeSet{};
    again.store_saved = false;
    const std::vector<int64_t> load = s.expert_load;
    forward(ps, s.x, scratch, s, again);
    s.expert_load = load;
  }
  if (s.stored) restore(ps, s, ctx);
  if (s.trimmed) restore_selective(ps, s, ctx);
  const int64_t rows = dout.dim(0);
  // FFN branch: dh = dout + norm_post^T(FFN^T(dout)).
  OwnedTensor dout_all;
  const Tensor dout_in = tp_gather_rows(mp_, dout, dout_all, "block.dout_all");
  OwnedTensor dhn = act_out({rows, d_}, "block.dhn"), dh = act_out({rows, d_}, "block.dh");
  if (moe_)
    moe_->backward(ps, s.moe, dout_in, dhn, ctx);
  else
    mlp_->backward(ps, s.mlp, dout_in, dhn, /*accumulate=*/false, ctx);
  std::memcpy(dh.t.data(), dout.data(), dout.bytes());
  stream_rmsnorm_backward(mp_, s.h, ps.compute(norm_post_), s.hn_rstd, dhn, dh, ps.grad(norm_post_),
                          /*accumulate_dx=*/true);
  round_act(ctx, dh);
  // Attention branch: dx = dh + norm_in^T(MLA^T(dh)).
  OwnedTensor dh_all;
  const Tensor dh_in = tp_gather_rows(mp_, dh, dh_all, "block.dh_all");
  OwnedTensor dxn_all = act_out({ctx.T(), d_}, "block.dxn_all"), dxn;
  attn_.backward(ps, s.attn, dh_in, dxn_all, ctx);
  Tensor dxn_rows = dxn_all.t;
  if (mp_.sp) {
    dxn = act_out({rows, d_}, "block.dxn");
    tp_slice_rows(mp_, dxn_all, dxn, /*accumulate=*/false);
    dxn_rows = dxn.t;
  }
  std::memcpy(dx.data(), dh.t.data(), dh.t.bytes());
  stream_rmsnorm_backward(mp_, s.x, ps.compute(norm_in_), s.xn_rstd, dxn_rows, dx, ps.grad(norm_in_),
                          /*accumulate_dx=*/true);
  round_act(ctx, dx);
  s.clear();
}

}  // namespace dsv3
