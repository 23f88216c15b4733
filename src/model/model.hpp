// The DeepSeek-V3 model: embedding, num_dense_layers dense blocks then MoE blocks, final RMSNorm,
// untied head, MTP modules sharing embedding and head, and the losses (MODEL.md). Explicit forward
// and backward; parameters and gradients in the ParamStore's flat buffers.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "config/config.hpp"
#include "model/block.hpp"
#include "model/mtp.hpp"
#include "model/parallel.hpp"
#include "model/params.hpp"

namespace dsv3 {

struct StepLosses {
  double total = 0, main = 0, balance = 0;
  std::vector<double> mtp;     // per depth
  int64_t tokens = 0;          // B * S predicted positions of the main model
  int64_t dispatch_bytes = 0;  // bytes this rank sent to other EP ranks in the MoE dispatches
  int64_t dropped = 0;         // (token, expert) assignments dropped by the capacity factor
  int64_t assignments = 0;     // (token, expert) assignments routed in all MoE layers
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

// What one micro-batch leaves on a pipeline stage between its forward and its backward.
struct MicroBatchState {
  StepContext ctx;
  OwnedTensor ids;                                   // [T] input ids (first stage)
  std::vector<OwnedTensor> hs;                       // inputs of the local blocks, then the stage output
  std::vector<Block::Saved> saved;                   // per local block
  std::vector<OwnedTensor> mtp_ids, mtp_e, mh, dmh;  // last stage, per MTP depth
  std::vector<MTPModule::Saved> msaved;
  OwnedTensor dh;       // last stage: gradient of the trunk output
  OwnedTensor d_input;  // gradient of the stage input (stages after the first)
  bool training = false;
  int64_t chunk = 0;  // the model chunk (virtual pipeline stage) it ran on
};

class Model {
 public:
  // The whole model on one rank, or this rank's part of it (its pipeline stage, tensor-parallel
  // shards and experts) under a ModelParallel whose communicators outlive the model.
  explicit Model(const Config& cfg, const ModelParallel& mp = {});
  // Initialises parameters with the deterministic generator (training.seed unless given).
  void initialize(uint64_t seed);

  ParamStore& params() { return params_; }
  const ParamStore& params() const { return params_; }
  const ModelConfig& config() const { return m_; }

  // tokens [B, S + D + 1] i32 (D = MTP depth). Runs forward and backward; gradients ACCUMULATE into
  // params().grad (scaled by grad_scale). Throws dsv3::Error naming the tensor for bad input.
  // One pipeline stage only (pp = 1).
  StepLosses forward_backward(const Tensor& tokens, float grad_scale = 1.0f, ModelCapture* capture = nullptr);
  // Forward only (evaluation): the same losses, no gradients, nothing saved. pp = 1.
  StepLosses forward(const Tensor& tokens, ModelCapture* capture = nullptr);

  // ---- pipeline stages ----
  // Runs this stage's forward of one micro-batch. `input` [T, d] is the previous stage's output
  // (ignored on the first stage). Returns the losses this stage computes (main and MTP losses on the
  // last stage, the balance losses of its MoE layers everywhere; the stages' sums are the model's),
  // with the head gradients already taken on the last stage when training. The stage output for the
  // next stage is st.hs.back().
  StepLosses stage_forward(const Tensor& tokens, const Tensor& input, MicroBatchState& st, bool training,
                           float grad_scale = 1.0f, ModelCapture* capture = nullptr, int64_t chunk = 0);
  // Backward of one micro-batch: `d_output` [T, d] from the next stage (ignored on the last stage).
  // The gradient of the stage input lands in st.d_input (stages after the first). `ready(dense_from,
  // expert_from)` is called whenever the gradients of every parameter at or after those flat offsets
  // (in each region) are complete for this micro-batch, for bucketed reduction.
  void stage_backward(MicroBatchState& st, const Tensor& d_output,
                      const std::function<void(int64_t, int64_t)>& ready = {});

  // Aux-loss-free balancing: b_i += gamma * sign(mean load - load_i) for every MoE layer with a bias
  // on this rank (other layers in `load` are skipped).
  void update_router_bias(const std::map<int64_t, std::vector<int64_t>>& load);
  // The bias state of one MoE layer (empty Tensor if the layer has none or lives on another stage).
  Tensor router_bias(int64_t layer) const;
  // HF layer indices of every MoE layer of the full model (main trunk then MTP), on every stage.
  std::vector<int64_t> moe_layers() const;

  const RecomputeSet& recompute() const { return recompute_; }
  const Numerics& numerics() const { return num_; }
  void set_recompute(const RecomputeSet& r) { recompute_ = r; }
  int64_t mtp_depth() const { return m_.mtp.depth; }
  // Model chunks on this rank (ModelParallel::vp); the first chunk of the first stage embeds, the last
  // chunk of the last stage holds the head and MTP.
  int64_t chunks() const { return static_cast<int64_t>(chunks_.size()); }
  bool chunk_is_first(int64_t c) const { return mp_.first_stage() && c == 0; }
  bool chunk_is_last(int64_t c) const { return mp_.last_stage() && c == chunks() - 1; }
  // Index of the embedding table in params() (first stage, and the last stage's copy for MTP).
  size_t embedding_param() const { return embed_; }

 private:
  // Mean cross-entropy of head(RMSNorm(h; norm)) against targets; with dh set, also the gradients
  // (dh overwritten, head and norm weights accumulate) for loss coefficient `coef`.
  double head_loss(const Tensor& h, const Tensor& targets, size_t norm, float coef, const Tensor* dh,
                   OwnedTensor* logits_capture, const StepContext& ctx);
  void embed(const Tensor& ids, const Tensor& out) const;
  void embed_rows(const Tensor& ids, const Tensor& out) const;
  void embed_backward(const Tensor& ids, const Tensor& dout);
  void check_tokens(const Tensor& tokens) const;
  const Tensor& rope_cos(int64_t S);
  // Gradient-ready offsets of the parameters registered from index i on.
  std::pair<int64_t, int64_t> ready_from(size_t first_param) const;

  ModelConfig m_;
  ModelParallel mp_;
  ParamStore params_;
  RecomputeSet recompute_;
  Numerics num_;
  // This rank's model chunks (one per virtual pipeline stage), in layer order.
  struct Chunk {
    int64_t layer_begin = 0, layer_end = 0;
    std::vector<std::unique_ptr<Block>> blocks;  // layers [layer_begin, layer_end)
    std::vector<size_t> first_param;             // index of each block's first parameter
  };
  std::vector<Chunk> chunks_;
  bool has_embed_ = false;
  size_t embed_ = 0, final_norm_ = 0, head_ = 0;
  size_t tail_first_param_ = 0;  // last stage: index of model.norm.weight
  std::vector<std::unique_ptr<MTPModule>> mtp_;
  int64_t rope_S_ = -1;
  OwnedTensor cos_, sin_;
};

}  // namespace dsv3
