// MTP module forward and backward.
#include "model/mtp.hpp"

#include <cstring>

namespace dsv3 {

namespace {
std::string mtp_prefix(const ModelConfig& m, int64_t k) {
  return "model.layers." + std::to_string(m.num_layers + k - 1);
}
}  // namespace

MTPModule::MTPModule(const ModelConfig& m, ParamStore& ps, int64_t k, const ModelParallel& mp)
    : d_(m.d_model),
      eps_(static_cast<float>(m.norm_eps)),
      mp_(mp),
      enorm_(ps.add_replicated(mtp_prefix(m, k) + ".enorm.weight", {m.d_model}, mp.tp_rank, ParamInit::Ones,
                               ParamGroup::Dense, false)),
      hnorm_(ps.add_replicated(mtp_prefix(m, k) + ".hnorm.weight", {m.d_model}, mp.tp_rank, ParamInit::Ones,
                               ParamGroup::Dense, false)),
      eh_proj_(ps.add_replicated(mtp_prefix(m, k) + ".eh_proj.weight", {m.d_model, 2 * m.d_model}, mp.tp_rank,
                                 ParamInit::Normal)),
      head_norm_(ps.add_replicated(mtp_prefix(m, k) + ".shared_head.norm.weight", {m.d_model}, mp.tp_rank,
                                   ParamInit::Ones, ParamGroup::Dense, false)),
      block_(m, ps, m.num_layers + k - 1, /*moe=*/m.num_layers + k - 1 >= m.num_dense_layers, mp) {}

void MTPModule::forward(const ParamStore& ps, const Tensor& e, const Tensor& h_prev, const Tensor& out,
                        Saved& s, const StepContext& ctx) const {
  const int64_t rows = e.dim(0);
  s.h_prev = h_prev;
  s.e = e;
  s.e_n = act_out({rows, d_}, "mtp.embedding_normed");
  s.e_rstd = act_out({rows}, "mtp.embedding_rstd");
  s.g_n = act_out({rows, d_}, "mtp.hidden_normed");
  s.g_rstd = act_out({rows}, "mtp.hidden_rstd");
  ops::rmsnorm_forward(s.e, ps.compute(enorm_), eps_, s.e_n, s.e_rstd);
  ops::rmsnorm_forward(h_prev, ps.compute(hnorm_), eps_, s.g_n, s.g_rstd);
  round_act(ctx, s.e_n), round_act(ctx, s.g_n);
  s.cat = act_out({rows, 2 * d_}, "mtp.concat");
  ops::copy_columns_backward(s.e_n, 0, s.cat);   // cat[:, 0:d] = e_n (embedding half first)
  ops::copy_columns_backward(s.g_n, d_, s.cat);  // cat[:, d:2d] = g_n
  s.e_n = {}, s.g_n = {};                        // the backward reads their concatenation only
  s.hp = act_out({rows, d_}, "mtp.eh_proj_out");
  if (!mp_.sp) {
    linear_fwd(ctx, GemmKind::Bf16, s.cat, ps.compute(eh_proj_), s.hp);
  } else {  // the replicated projection runs on all rows, so its gradient is the same on every rank
    tp_gather_rows(mp_, s.cat, s.cat_all, "mtp.concat_all");
    OwnedTensor hp_all = act_out({ctx.T(), d_}, "mtp.eh_proj_out_all");
    linear_fwd(ctx, GemmKind::Bf16, s.cat_all, ps.compute(eh_proj_), hp_all);
    tp_slice_rows(mp_, hp_all, s.hp, /*accumulate=*/false);
  }
  block_.forward(ps, s.hp, out, s.block, ctx);
  if (ctx.training && ctx.num.bf16)
    for (OwnedTensor* t : {&s.cat, &s.cat_all, &s.hp}) store_bf16(*t);
}

void MTPModule::backward(const ParamStore& ps, Saved& s, const Tensor& dout, const Tensor& dh_prev,
                         const Tensor& de, const StepContext& ctx) const {
  const int64_t rows = dout.dim(0);
  load_f32(s.hp);  // the block's input; the concatenation is restored after the block's backward
  s.block.x = s.hp.t;
  OwnedTensor dhp = act_out({rows, d_}, "mtp.d_eh_proj_out");
  block_.backward(ps, s.block, dout, dhp, ctx);
  for (OwnedTensor* t : {&s.cat, &s.cat_all}) load_f32(*t);
  OwnedTensor dcat = act_out({rows, 2 * d_}, "mtp.d_concat");
  if (!mp_.sp) {
    linear_dgrad(ctx, GemmKind::Bf16, dhp, ps.compute(eh_proj_), dcat);
    linear_wgrad(ctx, GemmKind::Bf16, dhp, s.cat, ps.grad(eh_proj_));
  } else {
    OwnedTensor dhp_all, dcat_all = act_out({ctx.T(), 2 * d_}, "mtp.d_concat_all");
    const Tensor dhp_in = tp_gather_rows(mp_, dhp, dhp_all, "mtp.d_eh_proj_out_all");
    linear_dgrad(ctx, GemmKind::Bf16, dhp_in, ps.compute(eh_proj_), dcat_all);
    linear_wgrad(ctx, GemmKind::Bf16, dhp_in, s.cat_all, ps.grad(eh_proj_));
    tp_slice_rows(mp_, dcat_all, dcat, /*accumulate=*/false);
  }
  OwnedTensor de_n = act_out({rows, d_}, "mtp.d_embedding_normed"),
              dg_n = act_out({rows, d_}, "mtp.d_hidden_normed");
  ops::copy_columns(dcat, 0, de_n);
  ops::copy_columns(dcat, d_, dg_n);
  stream_rmsnorm_backward(mp_, s.e, ps.compute(enorm_), s.e_rstd, de_n, de, ps.grad(enorm_));
  stream_rmsnorm_backward(mp_, s.h_prev, ps.compute(hnorm_), s.g_rstd, dg_n, dh_prev, ps.grad(hnorm_),
                          /*accumulate_dx=*/true);
  round_act(ctx, de), round_act(ctx, dh_prev);
}

}  // namespace dsv3
