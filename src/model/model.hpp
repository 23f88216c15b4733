// The DeepSeek-V3 model: embedding, num_dense_layers dense blocks then MoE blocks, final RMSNorm,
// untied head, MTP modules sharing embedding and head, and the losses (MODEL.md). Explicit forward
// and backward; parameters and gradients in the ParamStore's flat buffers.
#pragma once

#include <map>
#include <memory>
#include <vector>

#include "config/config.hpp"
#include "model/block.hpp"
#include "model/mtp.hpp"
#include "model/params.hpp"

namespace dsv3 {

struct StepLosses {
  double total = 0, main = 0, balance = 0;
  std::vector<double> mtp;  // per depth
  int64_t tokens = 0;       // B * S predicted positions of the main model
  int64_t dropped = 0;      // (token, expert) assignments dropped by the capacity factor
  int64_t assignments = 0;  // (token, expert) assignments routed in all MoE layers
  // Kept assignments per expert for every MoE layer (HF layer index -> [E]), for the bias update.
  std::map<int64_t, std::vector<int64_t>> expert_load;
};

// Optional captures for tests (logits of every head, the last hidden state, router choices).
struct ModelCapture {
  OwnedTensor logits;                                             // [T, V]
  std::vector<OwnedTensor> mtp_logits;                            // D x [T, V]
  OwnedTensor hidden_final;                                       // [T, d]
  std::map<int64_t, std::pair<OwnedTensor, OwnedTensor>> router;  // layer -> (idx [T,K], weights [T,K])
};

class Model {
 public:
  explicit Model(const Config& cfg);
  // Initialises parameters with the deterministic generator (training.seed unless given).
  void initialize(uint64_t seed);

  ParamStore& params() { return params_; }
  const ParamStore& params() const { return params_; }
  const ModelConfig& config() const { return m_; }

  // tokens [B, S + D + 1] i32 (D = MTP depth). Runs forward and backward; gradients ACCUMULATE into
  // params().grad (scaled by grad_scale). Throws dsv3::Error naming the tensor for bad input.
  StepLosses forward_backward(const Tensor& tokens, float grad_scale = 1.0f, ModelCapture* capture = nullptr);
  // Forward only (evaluation): the same losses, no gradients, nothing saved.
  StepLosses forward(const Tensor& tokens, ModelCapture* capture = nullptr);

  // Aux-loss-free balancing: b_i += gamma * sign(mean load - load_i) for every MoE layer with a bias.
  void update_router_bias(const std::map<int64_t, std::vector<int64_t>>& load);
  // The bias state of one MoE layer (empty Tensor if the layer has none).
  Tensor router_bias(int64_t layer) const;

  Recompute recompute() const { return recompute_; }
  void set_recompute(Recompute r) { recompute_ = r; }
  int64_t mtp_depth() const { return m_.mtp.depth; }

 private:
  StepLosses run(const Tensor& tokens, bool training, float grad_scale, ModelCapture* capture);
  // Mean cross-entropy of head(RMSNorm(h; norm)) against targets; with dh set, also the gradients
  // (dh overwritten, head and norm weights accumulate) for loss coefficient `coef`.
  double head_loss(const Tensor& h, const Tensor& targets, size_t norm, float coef, const Tensor* dh,
                   OwnedTensor* logits_capture, const StepContext& ctx);
  void check_tokens(const Tensor& tokens) const;
  const Tensor& rope_cos(int64_t S);

  ModelConfig m_;
  ParamStore params_;
  Recompute recompute_ = Recompute::None;
  size_t embed_, final_norm_, head_;
  std::vector<std::unique_ptr<Block>> blocks_;
  std::vector<std::unique_ptr<MTPModule>> mtp_;
  int64_t rope_S_ = -1;
  OwnedTensor cos_, sin_;
};

}  // namespace dsv3
