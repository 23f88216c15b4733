// Hugging Face interop for DeepSeek-V3 models: config.json <-> ModelConfig, the list of tensors a
// config implies (names as in HF, shapes as dsv3::Model registers them), and streaming conversion
// between our checkpoints and safetensors directories (export: one file or model-0000i-of-0000N
// shards + model.safetensors.index.json; import: BF16/F16/F32 and FP8 E4M3 with 128x128 block
// scales). Both directions hold one tensor in memory at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.hpp"

namespace dsv3::hf {

struct TensorSpec {
  std::string name;  // HF name
  std::vector<int64_t> shape;
  bool state = false;  // a buffer (router bias), not a trainable parameter
};

// Every parameter and buffer dsv3::Model registers for `m`, in its registration order (parameters
// and states interleaved as the layers declare them).
std::vector<TensorSpec> model_tensors(const ModelConfig& m);
// The tensors the HF layout repeats inside each MTP module, as (HF name, the tensor it copies):
// model.layers.{L+k-1}.embed_tokens.weight and model.layers.{L+k-1}.shared_head.head.weight.
std::vector<std::pair<std::string, std::string>> mtp_shared_copies(const ModelConfig& m);

// config.json of a DeepseekV3ForCausalLM; torch_dtype "bfloat16" or "float32".
nlohmann::ordered_json config_json(const ModelConfig& m, const std::string& torch_dtype);
// The reverse; `where` names the file in errors. Keys a dsv3 model cannot express (tied embeddings,
// another activation, other RoPE scalings, kv heads != heads) are errors.
ModelConfig model_config_from_json(const nlohmann::json& j, const std::string& where);
// A complete dsv3 YAML config around a model section (defaults for training, parallel, ...).
std::string yaml_for_model(const ModelConfig& m, const std::string& name, const std::string& description);

// "5GB" (10^9), "500MB", "2GiB" (2^30), "1000" (bytes).
uint64_t parse_size(const std::string& s);

// done tensors out of total, and the one being converted.
using Progress = std::function<void(size_t done, size_t total, const std::string& tensor)>;

struct ExportOptions {
  std::string dtype = "bf16";  // bf16 | fp32 (router biases stay F32)
  uint64_t max_shard_bytes = 5'000'000'000ull;
  Progress progress;
};
struct ExportSummary {
  std::vector<std::string> files;  // safetensors files written
  size_t tensors = 0;
  uint64_t bytes = 0;  // tensor bytes over all files
};
ExportSummary export_hf(const std::string& checkpoint, const std::string& out_dir,
                        const ExportOptions& o = {});

struct ImportOptions {
  std::string config_path;  // optional dsv3 YAML to check config.json against and to take training keys from
  Progress progress;
};
struct ImportSummary {
  std::string path;
  size_t tensors = 0;                // written to the checkpoint
  size_t fp8_tensors = 0;            // of those, dequantised from FP8
  std::vector<std::string> ignored;  // HF tensors not part of the model (MTP copies excluded)
};
// Writes a weights-only checkpoint (no /optimizer, step 0) of the HF model in `hf_dir`.
ImportSummary import_hf(const std::string& hf_dir, const std::string& checkpoint,
                        const ImportOptions& o = {});

}  // namespace dsv3::hf
