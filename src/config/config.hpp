// Typed configuration of a dsv3 run, loaded from YAML (configs/*.yaml) with `--set key=value`
// overrides. Every key the file may contain is declared once in config.cpp; unknown keys, wrong
// types, missing required keys and impossible values are reported as one dsv3::Error naming the
// file, the dotted key, its line and the reason.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace dsv3 {

struct RopeConfig {
  double theta = 10000.0;
  std::string scaling = "none";            // none | yarn
  double factor = 1.0;                     // YaRN context extension factor
  int64_t original_context_length = 4096;  // context the base frequencies were trained for
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 1.0;
};

struct MlaConfig {
  int64_t d_latent = 0;     // KV latent (HF kv_lora_rank)
  int64_t q_lora_rank = 0;  // 0: q = W_q x directly
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  bool use_fp8_kv = false;  // inference-side FP8 KV cache (reported; training uses the explicit form)
};

struct MoeConfig {
  int64_t num_experts = 0;            // routed experts (HF n_routed_experts)
  int64_t num_experts_per_token = 0;  // top-k (HF num_experts_per_tok)
  int64_t num_shared_experts = 0;
  int64_t expert_dim = 0;              // HF moe_intermediate_size
  int64_t num_groups = 1;              // HF n_group
  int64_t topk_groups = 1;             // HF topk_group
  std::string score_func = "sigmoid";  // sigmoid (V3) | softmax (V2)
  double route_scale = 1.0;            // HF routed_scaling_factor
  bool norm_topk_prob = true;
  bool aux_loss_free = true;         // bias-based balancing (selection only)
  double bias_update_speed = 0.001;  // gamma
  double seq_aux_alpha = 0.0;        // complementary sequence-wise balance loss weight
  double capacity_factor = 0.0;      // 0: no token dropping
  bool deep_ep_fp8 = false;          // FP8 dispatch payloads (GPU all-to-all)
};

struct MtpConfig {
  int64_t depth = 0;         // HF num_nextn_predict_layers
  double loss_weight = 0.3;  // lambda
};

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t d_model = 0;           // HF hidden_size
  int64_t num_layers = 0;        // HF num_hidden_layers
  int64_t num_dense_layers = 0;  // HF first_k_dense_replace
  int64_t num_heads = 0;
  int64_t ffn_dim = 0;         // dense FFN width (HF intermediate_size)
  int64_t context_length = 0;  // HF max_position_embeddings
  double norm_eps = 1e-6;
  double init_method_std = 0.006;
  MlaConfig mla;
  RopeConfig rope;
  MoeConfig moe;
  MtpConfig mtp;

  int64_t qk_head_dim() const { return mla.qk_nope_head_dim + mla.qk_rope_head_dim; }
  int64_t num_moe_layers() const { return num_layers - num_dense_layers; }
  bool yarn_active() const { return rope.scaling == "yarn" && context_length > rope.original_context_length; }
};

struct OptimizerConfig {
  std::string type = "adamw";
  double lr = 3e-4;
  double min_lr = 3e-5;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;             // global norm; 0 disables
  std::string moment_dtype = "fp32";  // fp32 | bf16: storage of AdamW's m and v
};

struct ScheduleConfig {
  std::string style = "cosine";  // cosine | constant_cosine | constant
  int64_t warmup_steps = 0;
  int64_t constant_steps = 0;  // constant_cosine: steps at peak after warm-up
};

struct TrainingConfig {
  int64_t micro_batch_size = 1;
  int64_t global_batch_size = 1;
  int64_t seq_length = 0;
  int64_t train_steps = 0;
  std::string precision = "bf16";  // fp32 | bf16 (weights/activations; master weights always fp32)
  bool use_fp8 = false;            // FP8 GEMMs (GPU)
  // Under use_fp8, the passes of each FP8 projection that run in FP8 (a list of fprop, dgrad and
  // wgrad; the others stay bf16), as Transformer Engine's override_linear_precision; empty: all three.
  std::vector<std::string> fp8_passes;
  // Under use_fp8, which projections are FP8 GEMMs (a list of attention: the MLA projections, and
  // ffn: the dense FFN and the shared and routed experts; the others stay bf16); empty: both.
  std::vector<std::string> fp8_modules;
  // Under use_fp8, which operands of those GEMMs are quantized to E4M3 (a list of activations, 1 x 128
  // tiles; weights, 128 x 128 blocks; gradients, the output gradients, 1 x 128 tiles); an unlisted one
  // enters them unquantized, in its bf16 values (an ablation that splits FP8's rounding by operand).
  // Empty: all three.
  std::vector<std::string> fp8_operands;
  // How the FP8 GEMMs round to E4M3: nearest (round to nearest even, the hardware's and the report's)
  // or stochastic (up or down with the probabilities that make the rounding unbiased; an ablation
  // that tells a deterministic rounding's bias from its size).
  std::string fp8_rounding = "nearest";
  std::string recompute = "none";  // none | selective | full
  // Under recompute: selective, what the backward rebuilds (kRecomputeModules); empty: DeepSeek-V3's
  // set (report section 3.2.3: the RMSNorms and the MLA up-projections, plus the SwiGLU products).
  std::vector<std::string> recompute_modules;
  int64_t seed = 1234;
  int64_t log_interval = 10;
  int64_t eval_interval = 0;  // 0: no periodic validation
  int64_t eval_iters = 10;
  int64_t max_nonfinite_steps = 5;  // stop after this many skipped (NaN/Inf) steps in a row
  OptimizerConfig optimizer;
  ScheduleConfig schedule;
};

struct ParallelConfig {
  int64_t tp = 1;
  int64_t pp = 1;
  int64_t ep = 1;
  int64_t dp = 0;          // 0: derived from the world size
  int64_t expert_tp = 1;   // tensor parallelism inside an expert
  int64_t zero_stage = 1;  // 0 | 1 | 2
  bool sequence_parallel = false;
  int64_t virtual_stages = 1;  // pipeline model chunks per rank (interleaved 1F1B when > 1)
  // Layers of the last (virtual) pipeline stage, which also runs the head and the MTP modules; the
  // others split the rest evenly. 0: every stage gets an even share.
  int64_t last_stage_layers = 0;
  std::string order = "tp-ep-dp-pp";
};

struct HardwareConfig {
  std::string gpu_type = "H100-SXM-80GB";
  double gpu_memory_gb = 80.0;
  int64_t gpus_min = 1;
  int64_t gpus_recommended = 1;
  int64_t gpus_max = 0;        // 0: no upper bound
  double peak_tflops = 989.0;  // dense bf16 per GPU
  double assumed_mfu = 0.40;   // for throughput estimates only
  // Link bandwidths (GB/s per GPU, one direction) and the GPUs of one NVLink domain for the
  // planner's cost model; 0: the defaults of gpu_type (src/config/cost.cpp names their source).
  double nvlink_gbps = 0;
  double ib_gbps = 0;
  int64_t gpus_per_node = 0;
  // Share of the TP and EP communication time hidden behind compute in the cost model: 0 (this
  // trainer overlaps nothing) to 1 (DeepSeek-V3's DualPipe claims full overlap, report 3.2.1).
  double comm_overlap = 0;
  double quoted_tokens_per_s = 0;  // a published/seed throughput claim to compare with (0: none)
  int64_t quoted_gpus = 0;         // on this many GPUs
};

struct CheckpointConfig {
  std::string dir;          // empty: checkpoints/<name>
  int64_t interval = 1000;  // steps
  int64_t keep_last = 3;
  // Periodic saves copy the state to host buffers and write it on a background thread while
  // training goes on (the final save and the one on a stop signal wait for their write).
  bool async = true;
};

struct DataConfig {
  std::string path;                // Megatron indexed dataset prefix (.bin/.idx)
  std::string tokenizer = "byte";  // byte
  double valid_fraction = 0.01;
};

struct Config {
  std::string name;
  std::string description;
  ModelConfig model;
  TrainingConfig training;
  ParallelConfig parallel;
  HardwareConfig hardware;
  CheckpointConfig checkpoint;
  DataConfig data;

  std::string source_path;           // file it came from
  std::string yaml_text;             // effective YAML (file + overrides), for checkpoints
  std::map<std::string, int> lines;  // dotted key -> line in the file (1-based; 0 from --set)

  // "file:line: key" for messages about a key.
  std::string where(const std::string& key) const;
};

// What the backward rebuilds instead of keeping (training.recompute and training.recompute_modules;
// MODEL.md, "Recompute"). Every choice gives the gradient bits of none.
struct RecomputeSet {
  bool full = false;         // keep only each block's input and re-run its forward before its backward
  bool norms = false;        // RMSNorm outputs (block norms, MLA q and kv latent norms), from input + rstd
  bool mla_up_proj = false;  // MLA per-head q, k and v, from the latents (q_b / kv_b GEMMs and RoPE)
  bool swiglu = false;       // silu(g) * u of the dense FFNs, shared and routed experts
  bool any() const { return full || norms || mla_up_proj || swiglu; }
  // "none", "full", or "selective (norms, mla_up_proj, swiglu)".
  std::string text() const;
};
// The module names training.recompute_modules accepts, and selective's default set.
const std::vector<std::string>& recompute_module_names();
const std::vector<std::string>& default_recompute_modules();
// From a policy (none | selective | full) and a module list (selective only; empty: the default).
// Throws naming an unknown policy or module.
RecomputeSet recompute_set(const std::string& policy, const std::vector<std::string>& modules = {});
// "[norms,swiglu]": a module list as --set training.recompute_modules= takes it.
std::string recompute_modules_arg(const std::vector<std::string>& modules);
inline RecomputeSet recompute_set(const TrainingConfig& t) {
  return recompute_set(t.recompute, t.recompute_modules);
}

// A resolved process layout. dense grid: tp * pp * dp = world; expert grid: expert_tp * ep * edp * pp.
struct Layout {
  int64_t tp = 1, pp = 1, ep = 1, dp = 1, expert_tp = 1, zero_stage = 0;
  bool sequence_parallel = false;
  int64_t virtual_stages = 1;
  int64_t last_stage_layers = 0;
  int64_t world() const { return tp * pp * dp; }
  int64_t expert_dp() const { return tp * dp / (expert_tp * ep); }
};

// Loads, applies overrides ("a.b.c=value", YAML scalar syntax), type-checks and validates.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
Config load_config_from_string(const std::string& yaml, const std::string& display_name,
                               const std::vector<std::string>& overrides = {});

// Cross-field checks that do not depend on the world size (throws dsv3::Error).
void validate(const Config& cfg);

// Checks a layout against the model (divisibility, world size); world_size 0 skips the world check
// and a dp of 0 is then taken as 1. Throws dsv3::Error naming the numbers.
Layout resolve_layout(const Config& cfg, int64_t world_size);
void check_layout(const Config& cfg, const Layout& layout);

// Every key of the schema with its value as text ("model.mla.d_latent" -> "512"), in declaration
// order: the same list the loader reads.
std::vector<std::pair<std::string, std::string>> config_items(const Config& c);

// Every model.* key of the config with its value as text ("model.mla.d_latent" -> "512"), in the
// order of the YAML reference.
std::vector<std::pair<std::string, std::string>> model_config_items(const ModelConfig& m);

// "10b", "deepseek_v3_10b", "671b", "base" or a path -> a config file path.
std::string resolve_config_path(const std::string& name_or_path);
// configs/*.yaml in a stable order (tiny, 1b, 5b, 10b, 15b, 20b, base).
std::vector<std::string> list_config_paths();
std::string config_dir();

// The numerics a config trains with, in words: "fp32", "bf16", "bf16 + fp8 gemms + fp8 kv cache +
// fp8 dispatch" (the parts that are on). Checkpoints record it (root attribute 'precision').
std::string precision_summary(const Config& c);

}  // namespace dsv3
