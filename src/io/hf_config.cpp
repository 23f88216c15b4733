// The Hugging Face config.json of a DeepSeek-V3 model both ways, the YAML of an imported model, and
// size strings: the parts of hf.hpp that touch no file (and are fuzzed on their own, tests/fuzz).
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <map>
#include <sstream>

#include "core/error.hpp"
#include "io/hf.hpp"

namespace dsv3::hf {

namespace {
struct JsonKeys {
  const nlohmann::json& j;
  const std::string& where;

  bool present(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  int64_t integer(const char* k, bool required, int64_t fallback = 0) const {
    if (!present(k)) {
      DSV3_CHECK(!required, where, ": missing key '", k, "'");
      return fallback;
    }
    const auto& v = j[k];
    DSV3_CHECK(
        v.is_number_integer() || (v.is_number_float() && v.get<double>() == std::floor(v.get<double>())),
        where, ": key '", k, "' must be an integer, got ", v.dump());
    // In range of int64 (a float like 1e80 or an unsigned above 2^63 is not a size).
    DSV3_CHECK(v.is_number_float() ? std::fabs(v.get<double>()) < 9.2e18
                                   : !v.is_number_unsigned() || v.get<uint64_t>() <= uint64_t(INT64_MAX),
               where, ": key '", k, "' is out of range: ", v.dump());
    return v.is_number_integer() ? v.get<int64_t>() : static_cast<int64_t>(v.get<double>());
  }
  double number(const char* k, bool required, double fallback = 0) const {
    if (!present(k)) {
      DSV3_CHECK(!required, where, ": missing key '", k, "'");
      return fallback;
    }
    DSV3_CHECK(j[k].is_number(), where, ": key '", k, "' must be a number, got ", j[k].dump());
    return j[k].get<double>();
  }
  bool boolean(const char* k, bool fallback) const {
    if (!present(k)) return fallback;
    DSV3_CHECK(j[k].is_boolean(), where, ": key '", k, "' must be true or false, got ", j[k].dump());
    return j[k].get<bool>();
  }
  std::string string(const char* k, const std::string& fallback) const {
    if (!present(k)) return fallback;
    DSV3_CHECK(j[k].is_string(), where, ": key '", k, "' must be a string, got ", j[k].dump());
    return j[k].get<std::string>();
  }
};

}  // namespace

nlohmann::ordered_json config_json(const ModelConfig& m, const std::string& torch_dtype) {
  nlohmann::ordered_json j;
  j["architectures"] = {"DeepseekV3ForCausalLM"};
  j["model_type"] = "deepseek_v3";
  j["vocab_size"] = m.vocab_size;
  j["hidden_size"] = m.d_model;
  j["intermediate_size"] = m.ffn_dim;
  j["moe_intermediate_size"] = m.moe.expert_dim;
  j["num_hidden_layers"] = m.num_layers;
  j["first_k_dense_replace"] = m.num_dense_layers;
  j["num_attention_heads"] = m.num_heads;
  j["num_key_value_heads"] = m.num_heads;
  j["n_routed_experts"] = m.moe.num_experts;
  j["n_shared_experts"] = m.moe.num_shared_experts;
  j["num_experts_per_tok"] = m.moe.num_experts_per_token;
  j["n_group"] = m.moe.num_groups;
  j["topk_group"] = m.moe.topk_groups;
  j["routed_scaling_factor"] = m.moe.route_scale;
  j["scoring_func"] = m.moe.score_func;
  j["topk_method"] = m.moe.aux_loss_free    ? "noaux_tc"
                     : m.moe.num_groups > 1 ? "group_limited_greedy"
                                            : "greedy";
  j["norm_topk_prob"] = m.moe.norm_topk_prob;
  j["moe_layer_freq"] = 1;
  j["ep_size"] = 1;
  if (m.mla.q_lora_rank > 0)
    j["q_lora_rank"] = m.mla.q_lora_rank;
  else
    j["q_lora_rank"] = nullptr;
  j["kv_lora_rank"] = m.mla.d_latent;
  j["qk_nope_head_dim"] = m.mla.qk_nope_head_dim;
  j["qk_rope_head_dim"] = m.mla.qk_rope_head_dim;
  j["v_head_dim"] = m.mla.v_head_dim;
  j["rope_theta"] = m.rope.theta;
  if (m.rope.scaling == "yarn") {
    nlohmann::ordered_json r;
    r["type"] = "yarn";
    r["factor"] = m.rope.factor;
    r["original_max_position_embeddings"] = m.rope.original_context_length;
    r["beta_fast"] = m.rope.beta_fast;
    r["beta_slow"] = m.rope.beta_slow;
    r["mscale"] = m.rope.mscale;
    r["mscale_all_dim"] = m.rope.mscale_all_dim;
    j["rope_scaling"] = r;
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["rope_interleave"] = true;  // RoPE pairs (2i, 2i+1), as DeepSeek's weights expect
  j["max_position_embeddings"] = m.context_length;
  j["rms_norm_eps"] = m.norm_eps;
  j["num_nextn_predict_layers"] = m.mtp.depth;
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["initializer_range"] = m.init_method_std;
  j["tie_word_embeddings"] = false;
  j["use_cache"] = true;
  j["torch_dtype"] = torch_dtype;
  return j;
}

ModelConfig model_config_from_json(const nlohmann::json& j, const std::string& where) {
  DSV3_CHECK(j.is_object(), where, ": config.json must be a JSON object");
  const JsonKeys k{j, where};
  const std::string type = k.string("model_type", "deepseek_v3");
  DSV3_CHECK(type == "deepseek_v3", where, ": model_type is '", type, "'; only deepseek_v3 converts");
  DSV3_CHECK(!k.boolean("tie_word_embeddings", false), where,
             ": tie_word_embeddings is true, but dsv3 models have an untied lm_head");
  const std::string act = k.string("hidden_act", "silu");
  DSV3_CHECK(act == "silu", where, ": hidden_act is '", act, "'; dsv3 uses silu (SwiGLU)");
  DSV3_CHECK(!k.boolean("attention_bias", false), where, ": attention_bias is true; dsv3 has no biases");

  ModelConfig m;
  m.vocab_size = k.integer("vocab_size", true);
  m.d_model = k.integer("hidden_size", true);
  m.num_layers = k.integer("num_hidden_layers", true);
  m.num_dense_layers = k.integer("first_k_dense_replace", false, 0);
  m.num_heads = k.integer("num_attention_heads", true);
  const int64_t kv_heads = k.integer("num_key_value_heads", false, m.num_heads);
  DSV3_CHECK(kv_heads == m.num_heads, where, ": num_key_value_heads (", kv_heads,
             ") must equal num_attention_heads (", m.num_heads, ") for MLA");
  m.ffn_dim = k.integer("intermediate_size", false, 0);
  m.context_length = k.integer("max_position_embeddings", true);
  m.norm_eps = k.number("rms_norm_eps", false, 1e-6);
  m.init_method_std = k.number("initializer_range", false, m.init_method_std);
  m.mla.d_latent = k.integer("kv_lora_rank", true);
  m.mla.q_lora_rank = k.integer("q_lora_rank", false, 0);
  m.mla.qk_nope_head_dim = k.integer("qk_nope_head_dim", true);
  m.mla.qk_rope_head_dim = k.integer("qk_rope_head_dim", true);
  m.mla.v_head_dim = k.integer("v_head_dim", true);
  m.rope.theta = k.number("rope_theta", false, 10000.0);
  if (k.present("rope_scaling")) {
    const auto& r = j["rope_scaling"];
    DSV3_CHECK(r.is_object(), where, ": rope_scaling must be an object or null");
    const JsonKeys rk{r, where};
    const std::string rt = rk.string("type", rk.string("rope_type", ""));
    DSV3_CHECK(rt == "yarn", where, ": rope_scaling type '", rt, "' is not supported (yarn or null)");
    m.rope.scaling = "yarn";
    m.rope.factor = rk.number("factor", true);
    m.rope.original_context_length = rk.integer("original_max_position_embeddings", true);
    m.rope.beta_fast = rk.number("beta_fast", false, 32.0);
    m.rope.beta_slow = rk.number("beta_slow", false, 1.0);
    m.rope.mscale = rk.number("mscale", false, 1.0);
    m.rope.mscale_all_dim = rk.number("mscale_all_dim", false, 1.0);
  } else {
    m.rope.scaling = "none";
  }
  const bool has_moe = m.num_dense_layers < m.num_layers;
  m.moe.num_experts = k.integer("n_routed_experts", has_moe, 0);
  m.moe.num_experts_per_token = k.integer("num_experts_per_tok", has_moe, 0);
  m.moe.expert_dim = k.integer("moe_intermediate_size", has_moe, 0);
  m.moe.num_shared_experts = k.integer("n_shared_experts", false, 0);
  m.moe.num_groups = k.integer("n_group", false, 1);
  m.moe.topk_groups = k.integer("topk_group", false, 1);
  m.moe.route_scale = k.number("routed_scaling_factor", false, 1.0);
  m.moe.score_func = k.string("scoring_func", "sigmoid");
  m.moe.norm_topk_prob = k.boolean("norm_topk_prob", true);
  const std::string method = k.string("topk_method", "noaux_tc");
  if (method == "noaux_tc") {
    m.moe.aux_loss_free = true;
  } else if (method == "group_limited_greedy") {
    m.moe.aux_loss_free = false;
  } else if (method == "greedy") {
    m.moe.aux_loss_free = false;
    m.moe.num_groups = m.moe.topk_groups = 1;  // no group restriction
  } else {
    raise(where, ": topk_method '", method, "' is not supported (noaux_tc, group_limited_greedy, greedy)");
  }
  const int64_t freq = k.integer("moe_layer_freq", false, 1);
  DSV3_CHECK(freq == 1, where, ": moe_layer_freq ", freq, " is not supported (every layer after ",
             "first_k_dense_replace is MoE)");
  m.mtp.depth = k.integer("num_nextn_predict_layers", false, 0);
  return m;
}

std::string yaml_for_model(const ModelConfig& m, const std::string& name, const std::string& description) {
  YAML::Node root;
  root["name"] = name;
  root["description"] = description;
  for (const auto& [key, value] : model_config_items(m)) {
    std::vector<std::string> parts;
    std::stringstream ss(key);
    for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
    if (parts.size() == 2)
      root[parts[0]][parts[1]] = value;
    else
      root[parts[0]][parts[1]][parts[2]] = value;
  }
  root["training"]["seq_length"] = std::to_string(std::min<int64_t>(m.context_length, 4096));
  YAML::Emitter out;
  out << root;
  return std::string(out.c_str()) + "\n";
}

uint64_t parse_size(const std::string& s) {
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  DSV3_CHECK(i > 0, "size '", s, "' must start with a number (e.g. 5GB, 500MB, 2GiB)");
  const double v = std::stod(s.substr(0, i));
  std::string unit = s.substr(i);
  std::transform(unit.begin(), unit.end(), unit.begin(), ::toupper);
  static const std::map<std::string, double> units = {
      {"", 1},      {"B", 1},        {"KB", 1e3},        {"MB", 1e6},           {"GB", 1e9},
      {"TB", 1e12}, {"KIB", 1024.0}, {"MIB", 1048576.0}, {"GIB", 1073741824.0}, {"TIB", 1099511627776.0}};
  auto it = units.find(unit);
  DSV3_CHECK(it != units.end(), "size '", s, "': unknown unit '", s.substr(i),
             "' (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)");
  DSV3_CHECK(v * it->second >= 1, "size '", s, "' must be at least one byte");
  return static_cast<uint64_t>(v * it->second);
}

}  // namespace dsv3::hf
