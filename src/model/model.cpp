// Model forward/backward over a micro-batch, losses, and the router bias update.
#include "model/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.hpp"
#include "core/lowp.hpp"
#include "parallel/comm.hpp"
#include "profile.hpp"

namespace dsv3 {

Model::Model(const Config& cfg, const ModelParallel& mp)
    : m_(cfg.model), mp_(mp), recompute_(recompute_set(cfg.training)), num_(numerics_of(cfg)) {
  const bool last = mp_.last_stage(), first = mp_.first_stage();
  // The embedding on the first stage; the last stage keeps a tied copy for the MTP modules (replica 1:
  // its gradient is summed with the first stage's, and only the first stage writes it).
  has_embed_ = first || (last && m_.mtp.depth > 0);
  if (has_embed_)
    embed_ = params_.add_split("model.embed_tokens.weight", {m_.vocab_size, m_.d_model}, 0, mp_.tp_size,
                               mp_.tp_rank, ParamInit::Normal, ParamGroup::Dense, true, first ? 0 : 1);
  chunks_.resize(static_cast<size_t>(mp_.vp));
  for (int64_t c = 0; c < mp_.vp; ++c) {
    Chunk& ch = chunks_[static_cast<size_t>(c)];
    const StageLayers st =
        stage_layers(m_, mp_.pp_size * mp_.vp, c * mp_.pp_size + mp_.pp_rank, mp_.last_stage_layers);
    ch.layer_begin = st.begin, ch.layer_end = st.end;
    for (int64_t l = st.begin; l < st.end; ++l) {
      ch.first_param.push_back(params_.params().size());
      ch.blocks.push_back(std::make_unique<Block>(m_, params_, l, /*moe=*/l >= m_.num_dense_layers, mp_));
    }
  }
  if (last) {
    tail_first_param_ = params_.params().size();
    final_norm_ = params_.add_replicated("model.norm.weight", {m_.d_model}, mp_.tp_rank, ParamInit::Ones,
                                         ParamGroup::Dense, false);
    head_ = params_.add_split("lm_head.weight", {m_.vocab_size, m_.d_model}, 0, mp_.tp_size, mp_.tp_rank,
                              ParamInit::Normal);
    for (int64_t k = 1; k <= m_.mtp.depth; ++k)
      mtp_.push_back(std::make_unique<MTPModule>(m_, params_, k, mp_));
  }
  params_.allocate(mp_.dense_quantum, mp_.expert_quantum);
  if (num_.bf16) params_.enable_bf16_compute();
  initialize(static_cast<uint64_t>(cfg.training.seed));
}

std::pair<int64_t, int64_t> Model::ready_from(size_t first_param) const {
  int64_t dense = params_.dense_elements(), expert = params_.num_elements();
  const auto& ps = params_.params();
  for (size_t i = ps.size(); i-- > first_param;) {
    if (ps[i].group == ParamGroup::Dense)
      dense = ps[i].offset;
    else
      expert = ps[i].offset;
  }
  return {dense, expert};
}

std::vector<int64_t> Model::moe_layers() const {
  std::vector<int64_t> out;
  for (int64_t l = m_.num_dense_layers; l < m_.num_layers + m_.mtp.depth; ++l) out.push_back(l);
  return out;
}

// The embedding reads the fp32 table; under bf16 its output is rounded, which is the lookup of the
// bf16 compute table.
void Model::embed(const Tensor& ids, const Tensor& out) const {
  embed_rows(ids, out);
  if (num_.bf16) lowp::round_bf16(out.f32(), out.numel());
}

void Model::embed_rows(const Tensor& ids, const Tensor& out) const {
  if (!mp_.tp) {
    ops::embedding_forward(ids, params_.value(embed_), out);
    return;
  }
  const int64_t first = m_.vocab_size / mp_.tp_size * mp_.tp_rank;
  if (!mp_.sp) {
    ops::embedding_shard_forward(ids, params_.value(embed_), first, m_.vocab_size, out);
    tp_allreduce(mp_, out);
    return;
  }
  OwnedTensor part = act_out({ids.dim(0), m_.d_model}, "embedding.partial");
  ops::embedding_shard_forward(ids, params_.value(embed_), first, m_.vocab_size, part);
  tp_reduce_rows(mp_, part, out, /*accumulate=*/false);
}

void Model::embed_backward(const Tensor& ids, const Tensor& dout) {
  if (!mp_.tp) {
    ops::embedding_backward(ids, dout, params_.grad(embed_));
    return;
  }
  const int64_t first = m_.vocab_size / mp_.tp_size * mp_.tp_rank;
  OwnedTensor all;
  ops::embedding_shard_backward(ids, tp_gather_rows(mp_, dout, all, "embedding.d_out_all"), first,
                                m_.vocab_size, params_.grad(embed_));
}

void Model::initialize(uint64_t seed) {
  params_.initialize(seed, m_.init_method_std);
  params_.refresh_compute();
}

const Tensor& Model::rope_cos(int64_t S) {
  if (S != rope_S_) {
    const int64_t half = m_.mla.qk_rope_head_dim / 2;
    cos_ = OwnedTensor(DType::F32, {S, half}, "rope_cos");
    sin_ = OwnedTensor(DType::F32, {S, half}, "rope_sin");
    ops::rope_table(rope_params(m_), cos_, sin_);
    rope_S_ = S;
  }
  return cos_.t;
}

void Model::check_tokens(const Tensor& tokens) const {
  DSV3_CHECK(tokens.dtype() == DType::I32 && tokens.ndim() == 2, "model input: tensor '", tokens.name(),
             "' must be i32 [batch, seq + ", m_.mtp.depth + 1, "], got ", tokens.describe());
  const int64_t B = tokens.dim(0), W = tokens.dim(1), S = W - m_.mtp.depth - 1;
  DSV3_CHECK(B > 0 && S > 0, "model input: tensor '", tokens.name(), "' ", tokens.shape_str(),
             " holds no full window (need seq + MTP depth + 1 = S + ", m_.mtp.depth + 1, " tokens per row)");
  DSV3_CHECK(S <= m_.context_length, "model input: tensor '", tokens.name(), "' ", tokens.shape_str(),
             " has sequences of ", S, " tokens, longer than model.context_length = ", m_.context_length);
  const int32_t* p = tokens.i32();
  for (int64_t i = 0; i < B * W; ++i)
    DSV3_CHECK(p[i] >= 0 && p[i] < m_.vocab_size, "model input: tensor '", tokens.name(), "'[", i / W, ", ",
               i % W, "] = ", p[i], " is outside the vocabulary [0, ", m_.vocab_size, ")");
}

double Model::head_loss(const Tensor& h, const Tensor& targets, size_t norm, float coef, const Tensor* dh,
                        OwnedTensor* logits_capture, const StepContext& ctx) {
  DSV3_PROFILE(Head);  // the head's norm, vocabulary GEMMs and cross-entropy
  const int64_t rows = h.dim(0), T = targets.dim(0), d = m_.d_model, V = m_.vocab_size, Vl = V / mp_.tp_size;
  const int64_t first = Vl * mp_.tp_rank;
  DSV3_CHECK(!logits_capture || !mp_.tp, "logits capture needs the whole vocabulary on one rank (tp = 1)");
  OwnedTensor hn_rows = act_out({rows, d}, "head.normed"), rstd = act_out({rows}, "head.rstd"), hn_all;
  ops::rmsnorm_forward(h, params_.compute(norm), static_cast<float>(m_.norm_eps), hn_rows, rstd);
  round_act(ctx, hn_rows);
  const Tensor hn = tp_gather_rows(mp_, hn_rows, hn_all, "head.normed_all");  // all T rows
  OwnedTensor dhn;
  if (dh) dhn = act_out({T, d}, "head.d_normed");
  if (logits_capture) *logits_capture = act({T, V}, "logits");
  // Rows per chunk so that one chunk of f32 logits stays near 16 MiB.
  const int64_t chunk = std::clamp<int64_t>((int64_t{1} << 22) / Vl, 1, T);
  OwnedTensor logits = act_out({chunk, Vl}, "head.logits_chunk"), losses = act_out({chunk}, "head.losses"),
              lse = act_out({chunk}, "head.lse"), dloss = act_out({chunk}, "head.dloss");
  OwnedTensor stats;  // vocabulary-parallel: [3, chunk] shard lse, target logit, sum of exponentials
  if (mp_.tp) stats = act_out({3, chunk}, "head.vocab_parallel_stats");
  const int32_t* tg = targets.i32();
  int64_t valid = 0;
  for (int64_t t = 0; t < T; ++t) valid += tg[t] >= 0;
  double sum = 0;
  for (int64_t c0 = 0; c0 < T; c0 += chunk) {
    const int64_t C = std::min(chunk, T - c0);
    const Tensor lg = logits.t.rows(0, C), ls = losses.t.rows(0, C), ll = lse.t.rows(0, C);
    const Tensor hc = hn.rows(c0, c0 + C), tc = targets.rows(c0, c0 + C);
    linear_fwd(ctx, GemmKind::Bf16, hc, params_.compute(head_), lg);  // bf16 logits, fp32 loss
    if (logits_capture) std::memcpy(logits_capture->t.rows(c0, c0 + C).data(), lg.data(), lg.bytes());
    if (!mp_.tp) {
      ops::cross_entropy_forward(lg, tc, ls, ll);
    } else {
      // Combine the shards: lse = M + log(sum_r exp(lse_r - M)), M = max_r lse_r.
      float* sl = stats.t.f32();
      float *tl = sl + chunk, *se = sl + 2 * chunk;
      ops::cross_entropy_shard_forward(lg, tc, first, V, stats.t.rows(0, 1).view({chunk}).rows(0, C),
                                       stats.t.rows(1, 2).view({chunk}).rows(0, C));
      std::vector<float> mx(sl, sl + C);
      mp_.tp->allreduce(mx.data(), C, ReduceOp::Max);
      for (int64_t i = 0; i < C; ++i) se[i] = std::exp(sl[i] - mx[i]);
      mp_.tp->allreduce(tl, C);
      mp_.tp->allreduce(se, C);
      for (int64_t i = 0; i < C; ++i) {
        ll.f32()[i] = mx[i] + std::log(se[i]);
        ls.f32()[i] = tc.i32()[i] < 0 ? 0.0f : ll.f32()[i] - tl[i];
      }
    }
    for (int64_t i = 0; i < C; ++i) sum += ls.f32()[i];
    if (!dh) continue;
    const Tensor dl = dloss.t.rows(0, C);
    std::fill(dl.f32(), dl.f32() + C, valid ? coef * ctx.grad_scale / static_cast<float>(valid) : 0.0f);
    if (!mp_.tp)
      ops::cross_entropy_backward(lg, tc, ll, dl);  // lg now holds dlogits
    else
      ops::cross_entropy_shard_backward(lg, tc, first, V, ll, dl);
    round_act(ctx, lg);
    StepContext part = ctx;
    if (mp_.tp) part.num.bf16 = false;  // vocabulary shards' partial gradients are summed in fp32
    linear_dgrad(part, GemmKind::Bf16, lg, params_.compute(head_), dhn.t.rows(c0, c0 + C));
    linear_wgrad(ctx, GemmKind::Bf16, lg, hc, params_.grad(head_));
  }
  if (dh) {
    // Each vocabulary shard contributes to the hidden gradient: sum them onto the stream rows.
    OwnedTensor dhn_rows;
    if (mp_.tp) {
      dhn_rows = act_out({rows, d}, "head.d_normed_rows");
      tp_reduce_rows(mp_, dhn, dhn_rows, /*accumulate=*/false);
    }
    if (mp_.tp) round_act(ctx, dhn_rows);
    stream_rmsnorm_backward(mp_, h, params_.compute(norm), rstd, mp_.tp ? dhn_rows.t : dhn.t, *dh,
                            params_.grad(norm));
    round_act(ctx, *dh);
  }
  return valid ? sum / static_cast<double>(valid) : 0.0;
}

StepLosses Model::forward_backward(const Tensor& tokens, float grad_scale, ModelCapture* capture) {
  DSV3_CHECK(mp_.pp_size == 1,
             "Model::forward_backward runs the whole model; with pipeline stages use "
             "stage_forward/stage_backward");
  MicroBatchState st;
  StepLosses out = stage_forward(tokens, Tensor(), st, true, grad_scale, capture);
  stage_backward(st, Tensor());
  return out;
}

StepLosses Model::forward(const Tensor& tokens, ModelCapture* capture) {
  DSV3_CHECK(mp_.pp_size == 1, "Model::forward runs the whole model; with pipeline stages use stage_forward");
  MicroBatchState st;
  return stage_forward(tokens, Tensor(), st, false, 1.0f, capture);
}

StepLosses Model::stage_forward(const Tensor& tokens, const Tensor& input, MicroBatchState& st, bool training,
                                float grad_scale, ModelCapture* capture, int64_t chunk) {
  DSV3_CHECK(chunk >= 0 && chunk < chunks(), "model chunk ", chunk, " outside [0, ", chunks(), ")");
  const Chunk& ch = chunks_[static_cast<size_t>(chunk)];
  st.chunk = chunk;
  check_tokens(tokens);
  const int64_t D = m_.mtp.depth, B = tokens.dim(0), W = tokens.dim(1), S = W - D - 1, T = B * S,
                d = m_.d_model;
  DSV3_CHECK(!mp_.sp || T % mp_.tp_size == 0, "sequence parallelism: ", B, " x ", S, " = ", T,
             " tokens per micro-batch do not split over tp = ", mp_.tp_size);
  const int64_t rows = mp_.stream_rows(T);  // residual-stream rows on this rank
  StepContext& ctx = st.ctx;
  ctx.B = B, ctx.S = S;
  ctx.rope_cos = rope_cos(S);
  ctx.rope_sin = sin_.t;
  ctx.attn_scale = attention_scale(m_);
  ctx.recompute = recompute_;
  ctx.training = training;
  ctx.grad_scale = grad_scale;
  ctx.num = num_;
  st.training = training;
  // The compute weights follow the masters (the optimizer and loads write only the masters).
  if (num_.bf16 && chunk == 0) params_.refresh_compute();

  // Token windows shifted by `shift`: [T] i32 of tokens[b, shift + s].
  auto shifted = [&](int64_t shift, const char* name) {
    OwnedTensor o(DType::I32, {T}, name);
    const int32_t* src = tokens.i32();
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(o.i32() + b * S, src + b * W + shift, static_cast<size_t>(S) * 4);
    return o;
  };

  // The local blocks, from the embedding (first stage) or the previous stage's output.
  const int64_t L = ch.layer_end - ch.layer_begin;
  st.hs.clear();
  st.hs.reserve(static_cast<size_t>(L + 1));
  st.hs.push_back(act_out({rows, d}, "hidden.in"));
  if (chunk_is_first(chunk)) {
    st.ids = shifted(0, "input_ids");
    embed(st.ids, st.hs[0]);
  } else {
    DSV3_CHECK(input.ndim() == 2 && input.dim(0) == rows && input.dim(1) == d, "pipeline stage ", mp_.pp_rank,
               ": input activation ", input.describe(), " should be [", rows, ", ", d, "]");
    std::memcpy(st.hs[0].t.data(), input.data(), input.bytes());
  }
  st.saved.clear();
  st.saved.resize(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    st.hs.push_back(act_out({rows, d}, "hidden." + std::to_string(ch.layer_begin + l + 1)));
    ch.blocks[l]->forward(params_, st.hs[l], st.hs[l + 1], st.saved[l], ctx);
    if (training && num_.bf16) store_bf16(st.hs[l]);  // block l's saved input, in bf16 until its backward
  }

  StepLosses out;
  out.tokens = T;
  auto collect = [&](const Block& blk, const Block::Saved& s) {
    if (!blk.is_moe()) return;
    out.balance += s.balance_loss;
    out.dispatch_bytes += s.dispatch_bytes;
    out.expert_load[blk.layer()] = s.expert_load;
    int64_t kept = 0;
    for (int64_t c : s.expert_load) kept += c;
    out.assignments += T * m_.moe.num_experts_per_token;
    out.dropped += T * m_.moe.num_experts_per_token - kept;
  };
  auto grab = [&](const Block& blk, const Block::Saved& s) {
    if (!capture || !blk.is_moe() || !s.filled) return;
    OwnedTensor idx(DType::I32, s.moe.idx.t.shape(), "router_idx"),
        w(DType::F32, s.moe.weights.t.shape(), "router_w");
    std::memcpy(idx.t.data(), s.moe.idx.t.data(), idx.t.bytes());
    std::memcpy(w.t.data(), s.moe.weights.t.data(), w.t.bytes());
    capture->router[blk.layer()] = {std::move(idx), std::move(w)};
  };
  for (int64_t l = 0; l < L; ++l) collect(*ch.blocks[l], st.saved[l]), grab(*ch.blocks[l], st.saved[l]);
  if (!chunk_is_last(chunk)) {
    out.total = out.balance;
    return out;
  }

  const Tensor& hL = st.hs[static_cast<size_t>(L)].t;
  if (capture) {
    DSV3_CHECK(!mp_.sp, "hidden-state capture needs all rows on one rank (no sequence parallelism)");
    capture->hidden_final = act({T, d}, "hidden_final");
    std::memcpy(capture->hidden_final.t.data(), hL.data(), hL.bytes());
  }
  const OwnedTensor targets = shifted(1, "targets");
  if (training) st.dh = act_out({rows, d}, "d_hidden_final");
  out.main = head_loss(hL, targets, final_norm_, 1.0f, training ? &st.dh.t : nullptr,
                       capture ? &capture->logits : nullptr, ctx);

  // MTP modules: forward (with their head losses and head gradients); backward in stage_backward.
  const float mtp_coef = D > 0 ? static_cast<float>(m_.mtp.loss_weight / D) : 0.0f;
  st.mtp_ids.clear(), st.mtp_e.clear(), st.mh.clear(), st.dmh.clear();
  st.msaved.clear();
  st.msaved.resize(static_cast<size_t>(D));
  if (capture) capture->mtp_logits.resize(static_cast<size_t>(D));
  for (int64_t k = 1; k <= D; ++k) {
    st.mtp_ids.push_back(shifted(k, "mtp_input_ids"));
    const OwnedTensor tgt_k = shifted(k + 1, "mtp_targets");
    st.mtp_e.push_back(act_out({rows, d}, "mtp.embedding"));
    embed(st.mtp_ids.back(), st.mtp_e.back());
    const Tensor& prev = k == 1 ? hL : st.mh.back().t;
    st.mh.push_back(act_out({rows, d}, "mtp_hidden." + std::to_string(k)));
    mtp_[k - 1]->forward(params_, st.mtp_e.back(), prev, st.mh.back(), st.msaved[k - 1], ctx);
    if (training) st.dmh.push_back(act_out({rows, d}, "d_mtp_hidden." + std::to_string(k)));
    out.mtp.push_back(head_loss(st.mh.back(), tgt_k, mtp_[k - 1]->head_norm(), mtp_coef,
                                training ? &st.dmh.back().t : nullptr,
                                capture ? &capture->mtp_logits[k - 1] : nullptr, ctx));
  }
  for (int64_t k = 0; k < D; ++k)
    collect(mtp_[k]->block(), st.msaved[k].block), grab(mtp_[k]->block(), st.msaved[k].block);

  double mtp_sum = 0;
  for (double v : out.mtp) mtp_sum += v;
  out.total = out.main + (D > 0 ? m_.mtp.loss_weight / D * mtp_sum : 0.0) + out.balance;
  return out;
}

void Model::stage_backward(MicroBatchState& st, const Tensor& d_output,
                           const std::function<void(int64_t, int64_t)>& ready) {
  DSV3_CHECK(st.training, "stage_backward after a forward without training");
  const StepContext& ctx = st.ctx;
  const Chunk& ch = chunks_[static_cast<size_t>(st.chunk)];
  const int64_t rows = mp_.stream_rows(ctx.T()), d = m_.d_model, D = m_.mtp.depth,
                L = ch.layer_end - ch.layer_begin;
  auto notify = [&](size_t first_param) {
    if (!ready) return;
    const auto [dense, expert] = ready_from(first_param);
    ready(dense, expert);
  };
  OwnedTensor cur;
  if (chunk_is_last(st.chunk)) {
    // MTP modules in reverse (module k's input gradient flows into module k-1's output).
    OwnedTensor de = D > 0 ? act_out({rows, d}, "mtp.d_embedding") : OwnedTensor();
    for (int64_t k = D; k >= 1; --k) {
      const Tensor& dprev = k == 1 ? st.dh.t : st.dmh[k - 2].t;
      mtp_[k - 1]->backward(params_, st.msaved[k - 1], st.dmh[k - 1], dprev, de, ctx);
      embed_backward(st.mtp_ids[k - 1], de);
    }
    notify(tail_first_param_);
    cur = std::move(st.dh);
  } else {
    DSV3_CHECK(d_output.ndim() == 2 && d_output.dim(0) == rows && d_output.dim(1) == d, "pipeline stage ",
               mp_.pp_rank, ": output gradient ", d_output.describe(), " should be [", rows, ", ", d, "]");
    cur = act_out({rows, d}, "d_hidden_out");
    std::memcpy(cur.t.data(), d_output.data(), d_output.bytes());
  }
  OwnedTensor dx = act_out({rows, d}, "d_hidden");
  for (int64_t l = L - 1; l >= 0; --l) {
    load_f32(st.hs[l]);
    st.saved[l].x = st.hs[l].t;
    ch.blocks[l]->backward(params_, st.saved[l], cur, dx, ctx);
    std::swap(cur, dx);  // cur now holds the gradient of block l's input
    notify(ch.first_param[l]);
  }
  if (chunk_is_first(st.chunk)) {
    embed_backward(st.ids, cur);
    notify(0);
  } else {
    st.d_input = std::move(cur);  // this chunk's parameters were reported with its first block
  }
  st.saved.clear(), st.msaved.clear(), st.hs.clear(), st.mh.clear(), st.dmh.clear(), st.mtp_e.clear();
}

void Model::update_router_bias(const std::map<int64_t, std::vector<int64_t>>& load) {
  const float gamma = static_cast<float>(m_.moe.bias_update_speed);
  for (const auto& [layer, counts] : load) {
    const Tensor b = router_bias(layer);
    if (b.empty()) continue;  // no bias, or the layer lives on another pipeline stage
    DSV3_CHECK(static_cast<int64_t>(counts.size()) == b.numel(), "router bias update: layer ", layer, " has ",
               counts.size(), " loads for ", b.numel(), " experts");
    double mean = 0;
    for (int64_t c : counts) mean += static_cast<double>(c);
    mean /= static_cast<double>(counts.size());
    float* p = b.f32();
    for (size_t e = 0; e < counts.size(); ++e) {
      const double c = static_cast<double>(counts[e]);
      if (c > mean)
        p[e] -= gamma;
      else if (c < mean)
        p[e] += gamma;
    }
  }
}

Tensor Model::router_bias(int64_t layer) const {
  const ParamEntry* e =
      params_.find("model.layers." + std::to_string(layer) + ".mlp.gate.e_score_correction_bias");
  return e ? e->value : Tensor();
}

}  // namespace dsv3
