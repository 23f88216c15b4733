// Model forward/backward over a micro-batch, losses, and the router bias update.
#include "model/model.hpp"

#include <algorithm>
#include <cstring>

#include "core/error.hpp"
#include "profile.hpp"

namespace dsv3 {

Model::Model(const Config& cfg) : m_(cfg.model), recompute_(parse_recompute(cfg.training.recompute)) {
  embed_ = params_.add("model.embed_tokens.weight", {m_.vocab_size, m_.d_model}, ParamInit::Normal);
  for (int64_t l = 0; l < m_.num_layers; ++l)
    blocks_.push_back(std::make_unique<Block>(m_, params_, l, /*moe=*/l >= m_.num_dense_layers));
  final_norm_ = params_.add("model.norm.weight", {m_.d_model}, ParamInit::Ones, ParamGroup::Dense, false);
  head_ = params_.add("lm_head.weight", {m_.vocab_size, m_.d_model}, ParamInit::Normal);
  for (int64_t k = 1; k <= m_.mtp.depth; ++k) mtp_.push_back(std::make_unique<MTPModule>(m_, params_, k));
  params_.allocate();
  initialize(static_cast<uint64_t>(cfg.training.seed));
}

void Model::initialize(uint64_t seed) { params_.initialize(seed, m_.init_method_std); }

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
  const int64_t T = h.dim(0), d = m_.d_model, V = m_.vocab_size;
  OwnedTensor hn = act_out({T, d}, "head.normed"), rstd = act_out({T}, "head.rstd");
  ops::rmsnorm_forward(h, params_.value(norm), static_cast<float>(m_.norm_eps), hn, rstd);
  OwnedTensor dhn;
  if (dh) dhn = act_out({T, d}, "head.d_normed");
  if (logits_capture) *logits_capture = act({T, V}, "logits");
  // Rows per chunk so that one chunk of f32 logits stays near 16 MiB.
  const int64_t chunk = std::clamp<int64_t>((int64_t{1} << 22) / V, 1, T);
  OwnedTensor logits = act_out({chunk, V}, "head.logits_chunk"), losses = act_out({chunk}, "head.losses"),
              lse = act_out({chunk}, "head.lse"), dloss = act_out({chunk}, "head.dloss");
  const int32_t* tg = targets.i32();
  int64_t valid = 0;
  for (int64_t t = 0; t < T; ++t) valid += tg[t] >= 0;
  double sum = 0;
  for (int64_t c0 = 0; c0 < T; c0 += chunk) {
    const int64_t C = std::min(chunk, T - c0);
    const Tensor lg = logits.t.rows(0, C), ls = losses.t.rows(0, C), ll = lse.t.rows(0, C);
    const Tensor hc = hn.t.rows(c0, c0 + C), tc = targets.rows(c0, c0 + C);
    ops::linear_forward(hc, params_.value(head_), lg);
    if (logits_capture) std::memcpy(logits_capture->t.rows(c0, c0 + C).data(), lg.data(), lg.bytes());
    ops::cross_entropy_forward(lg, tc, ls, ll);
    for (int64_t i = 0; i < C; ++i) sum += ls.f32()[i];
    if (!dh) continue;
    const Tensor dl = dloss.t.rows(0, C);
    std::fill(dl.f32(), dl.f32() + C, valid ? coef * ctx.grad_scale / static_cast<float>(valid) : 0.0f);
    ops::cross_entropy_backward(lg, tc, ll, dl);  // lg now holds dlogits
    ops::linear_backward_input(lg, params_.value(head_), dhn.t.rows(c0, c0 + C));
    ops::linear_backward_weight(lg, hc, params_.grad(head_));
  }
  if (dh) ops::rmsnorm_backward(h, params_.value(norm), rstd, dhn, *dh, params_.grad(norm));
  return valid ? sum / static_cast<double>(valid) : 0.0;
}

StepLosses Model::forward_backward(const Tensor& tokens, float grad_scale, ModelCapture* capture) {
  return run(tokens, true, grad_scale, capture);
}
StepLosses Model::forward(const Tensor& tokens, ModelCapture* capture) {
  return run(tokens, false, 1.0f, capture);
}

StepLosses Model::run(const Tensor& tokens, bool training, float grad_scale, ModelCapture* capture) {
  check_tokens(tokens);
  const int64_t D = m_.mtp.depth, B = tokens.dim(0), W = tokens.dim(1), S = W - D - 1, T = B * S,
                d = m_.d_model;
  StepContext ctx;
  ctx.B = B, ctx.S = S;
  ctx.rope_cos = rope_cos(S);
  ctx.rope_sin = sin_.t;
  ctx.attn_scale = attention_scale(m_);
  ctx.recompute = recompute_;
  ctx.training = training;
  ctx.grad_scale = grad_scale;

  // Token windows shifted by `shift`: [T] i32 of tokens[b, shift + s].
  auto shifted = [&](int64_t shift, const char* name) {
    OwnedTensor o(DType::I32, {T}, name);
    const int32_t* src = tokens.i32();
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(o.i32() + b * S, src + b * W + shift, static_cast<size_t>(S) * 4);
    return o;
  };
  const OwnedTensor ids = shifted(0, "input_ids"), targets = shifted(1, "targets");

  // Main trunk.
  const int64_t L = m_.num_layers;
  std::vector<OwnedTensor> hs;
  hs.reserve(static_cast<size_t>(L + 1));
  hs.push_back(act_out({T, d}, "hidden.0"));
  ops::embedding_forward(ids, params_.value(embed_), hs[0]);
  std::vector<Block::Saved> saved(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    hs.push_back(act_out({T, d}, "hidden." + std::to_string(l + 1)));
    blocks_[l]->forward(params_, hs[l], hs[l + 1], saved[l], ctx);
  }
  if (capture) {
    capture->hidden_final = act({T, d}, "hidden_final");
    std::memcpy(capture->hidden_final.t.data(), hs[L].t.data(), hs[L].t.bytes());
  }

  StepLosses out;
  out.tokens = T;
  OwnedTensor dh_L;
  if (training) dh_L = act_out({T, d}, "d_hidden_final");
  out.main = head_loss(hs[L], targets, final_norm_, 1.0f, training ? &dh_L.t : nullptr,
                       capture ? &capture->logits : nullptr, ctx);

  // MTP modules: forward (with their head losses and head gradients), then backward in reverse.
  const float mtp_coef = D > 0 ? static_cast<float>(m_.mtp.loss_weight / D) : 0.0f;
  std::vector<OwnedTensor> mh, dmh;
  std::vector<MTPModule::Saved> msaved(static_cast<size_t>(D));
  if (capture) capture->mtp_logits.resize(static_cast<size_t>(D));
  for (int64_t k = 1; k <= D; ++k) {
    const OwnedTensor ids_k = shifted(k, "mtp_input_ids"), tgt_k = shifted(k + 1, "mtp_targets");
    const Tensor& prev = k == 1 ? hs[L].t : mh.back().t;
    mh.push_back(act_out({T, d}, "mtp_hidden." + std::to_string(k)));
    mtp_[k - 1]->forward(params_, embed_, ids_k, prev, mh.back(), msaved[k - 1], ctx);
    if (training) dmh.push_back(act_out({T, d}, "d_mtp_hidden." + std::to_string(k)));
    out.mtp.push_back(head_loss(mh.back(), tgt_k, mtp_[k - 1]->head_norm(), mtp_coef,
                                training ? &dmh.back().t : nullptr,
                                capture ? &capture->mtp_logits[k - 1] : nullptr, ctx));
  }

  // Router statistics and balance losses of every MoE block (main, then MTP).
  auto collect = [&](const Block& blk, const Block::Saved& s) {
    if (!blk.is_moe()) return;
    out.balance += s.balance_loss;
    out.expert_load[blk.layer()] = s.expert_load;
    int64_t kept = 0;
    for (int64_t c : s.expert_load) kept += c;
    out.assignments += T * m_.moe.num_experts_per_token;
    out.dropped += T * m_.moe.num_experts_per_token - kept;
  };
  for (int64_t l = 0; l < L; ++l) collect(*blocks_[l], saved[l]);
  for (int64_t k = 0; k < D; ++k) collect(mtp_[k]->block(), msaved[k].block);
  if (capture) {
    auto grab = [&](const Block& blk, const Block::Saved& s) {
      if (!blk.is_moe() || !s.filled) return;
      OwnedTensor idx(DType::I32, s.moe.idx.t.shape(), "router_idx"),
          w(DType::F32, s.moe.weights.t.shape(), "router_w");
      std::memcpy(idx.t.data(), s.moe.idx.t.data(), idx.t.bytes());
      std::memcpy(w.t.data(), s.moe.weights.t.data(), w.t.bytes());
      capture->router[blk.layer()] = {std::move(idx), std::move(w)};
    };
    for (int64_t l = 0; l < L; ++l) grab(*blocks_[l], saved[l]);
    for (int64_t k = 0; k < D; ++k) grab(mtp_[k]->block(), msaved[k].block);
  }

  double mtp_sum = 0;
  for (double v : out.mtp) mtp_sum += v;
  out.total = out.main + (D > 0 ? m_.mtp.loss_weight / D * mtp_sum : 0.0) + out.balance;
  if (!training) return out;

  // Backward: MTP modules in reverse (module k's input gradient flows into module k-1's output).
  for (int64_t k = D; k >= 1; --k) {
    const Tensor& dprev = k == 1 ? dh_L.t : dmh[k - 2].t;
    mtp_[k - 1]->backward(params_, embed_, msaved[k - 1], dmh[k - 1], dprev, ctx);
  }
  OwnedTensor dx = act_out({T, d}, "d_hidden");
  Tensor dcur = dh_L.t;
  for (int64_t l = L - 1; l >= 0; --l) {
    blocks_[l]->backward(params_, saved[l], dcur, dx, ctx);
    std::swap(dh_L, dx);  // dh_L now holds the gradient of block l's input
    dcur = dh_L.t;
  }
  ops::embedding_backward(ids, dcur, params_.grad(embed_));
  return out;
}

void Model::update_router_bias(const std::map<int64_t, std::vector<int64_t>>& load) {
  const float gamma = static_cast<float>(m_.moe.bias_update_speed);
  for (const auto& [layer, counts] : load) {
    const Tensor b = router_bias(layer);
    if (b.empty()) continue;
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
