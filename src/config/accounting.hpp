// Accounting: parameters per component, training FLOPs per token and memory per GPU for a layout.
// One module shared by the planner (dsv3-config), the trainer (logging MFU, sizing buffers) and the
// tests, so the numbers a user is shown are the numbers the code allocates by.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config/config.hpp"

namespace dsv3 {

struct ComponentParams {
  int64_t total = 0;   // parameters stored
  int64_t active = 0;  // parameters a token passes through
};

struct ParamCounts {
  ComponentParams embedding, attention, dense_ffn, routed_experts, shared_experts, router, norms, head, mtp;
  // Main model (embedding and head counted once each, MTP excluded), as the published 671B/37B.
  int64_t total() const;
  int64_t active() const;
  // Including the MTP modules' own weights (they share embedding and head with the main model).
  int64_t total_with_mtp() const { return total() + mtp.total; }
  std::vector<std::pair<std::string, ComponentParams>> rows() const;
};

// Per-layer building blocks (weights only; norms separate), also used to size the model's buffers.
int64_t mla_params(const ModelConfig& m);               // q (or q_a/q_norm/q_b), kv_a, kv_norm, kv_b, o
int64_t swiglu_params(int64_t d_model, int64_t width);  // gate, up, down
int64_t moe_layer_params(const ModelConfig& m);         // router + routed + shared experts
int64_t mtp_module_params(const ModelConfig& m);  // enorm, hnorm, eh_proj, one MoE block, shared_head.norm

ParamCounts count_parameters(const ModelConfig& m);

struct FlopsPerToken {
  double matmul = 0;     // 6 x active matmul parameters (forward + backward)
  double attention = 0;  // score and value products, causal, forward + backward
  double total() const { return matmul + attention; }
};
// Training FLOPs per token at sequence length `seq` (MTP modules included).
FlopsPerToken training_flops_per_token(const ModelConfig& m, int64_t seq);

struct MemoryOptions {
  std::string recompute = "none";              // none | selective | full
  std::vector<std::string> recompute_modules;  // selective: the modules (empty: the default set)
  RecomputeSet recompute_set() const { return dsv3::recompute_set(recompute, recompute_modules); }
  int64_t micro_batch_size = 1;
  int64_t seq_length = 0;
  int64_t global_batch_size = 1;
  std::string precision = "bf16";  // fp32 | bf16
  bool fp8 = false;                // training.use_fp8 (FP8 GEMMs)
  bool bf16_moments = false;       // training.optimizer.moment_dtype: bf16 (Adam m, v at 2 B each)
  // The host backend's storage instead of a GPU's: fp32 masters beside the bf16 compute weights on
  // every rank, f32 temporaries, the block in its backward restored to f32, the FP8 GEMMs' copies.
  bool host = false;
  static MemoryOptions from(const Config& c);
};

struct MemoryEstimate {
  int64_t stage = 0;                                 // the pipeline stage that needs the most memory
  int64_t params_on_rank = 0;                        // parameters held by that rank
  double weights = 0, gradients = 0, optimizer = 0;  // bytes
  double activations = 0;                            // saved for backward, all in-flight micro-batches
  double moe_dispatch = 0;                           // all-to-all send/receive buffers
  double logits = 0;                                 // chunked cross-entropy workspace
  int64_t in_flight_microbatches = 1;
  double total() const { return weights + gradients + optimizer + activations + moe_dispatch + logits; }
  std::vector<std::string> assumptions;
};

// Bytes per GPU for the busiest rank of `layout`.
MemoryEstimate memory_per_gpu(const Config& c, const Layout& layout, const MemoryOptions& opt);

// Activation bytes one layer saves per token for backward (one micro-batch), before pipeline
// in-flight multiplication. Exposed for the model's own accounting tests.
double activation_bytes_per_token_dense_layer(const ModelConfig& m, const Layout& l, const RecomputeSet& r,
                                              double elem_bytes);
double activation_bytes_per_token_moe_layer(const ModelConfig& m, const Layout& l, const RecomputeSet& r,
                                            double elem_bytes);

// Temporaries of the backward of one block plus the model's hidden-state gradients, per token; with
// recompute, what the block rebuilds before its backward (all of it under full) on top.
double activation_workspace_bytes_per_token(const ModelConfig& m, const Layout& l, const RecomputeSet& r,
                                            double elem_bytes);

// The host backend's temporaries per token (MemoryOptions::host; otherwise the GPU workspace above),
// and the weight-sized buffers of its largest FP8 GEMM.
double host_workspace_bytes_per_token(const ModelConfig& m, const Layout& l, const MemoryOptions& o,
                                      double act_bytes);
double fp8_gemm_weight_bytes(const ModelConfig& m, const Layout& l);

// Layers held by pipeline stage `stage` of `pp` (earlier stages take the remainder). With
// last_layers > 0 the last stage holds that many and the others split the rest.
int64_t layers_in_stage(int64_t num_layers, int64_t pp, int64_t stage, int64_t last_layers = 0);
int64_t first_layer_of_stage(int64_t num_layers, int64_t pp, int64_t stage, int64_t last_layers = 0);

}  // namespace dsv3
