// YAML -> Config: the one declaration of every key (bind_all), type checks with line numbers,
// unknown-key detection, --set overrides and the cross-field validation.
#include "config/config.hpp"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "core/error.hpp"

namespace fs = std::filesystem;

namespace dsv3 {

std::string Config::where(const std::string& key) const {
  auto it = lines.find(key);
  std::string s = source_path;
  if (it != lines.end()) s += it->second > 0 ? ":" + std::to_string(it->second) : " (--set)";
  return s + ": " + key;
}

namespace {

const char* type_name(const int64_t*) { return "an integer"; }
const char* type_name(const double*) { return "a number"; }
const char* type_name(const bool*) { return "true or false"; }
const char* type_name(const std::string*) { return "a string"; }

bool parse_scalar(const std::string& s, int64_t& out) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (*end == '\0' && errno == 0) {
    out = v;
    return true;
  }
  // Allow integral scientific notation such as 1e6.
  double d = std::strtod(s.c_str(), &end);
  if (*end != '\0' || !std::isfinite(d) || d != std::floor(d) || std::fabs(d) > 9.0e18) return false;
  out = static_cast<int64_t>(d);
  return true;
}
bool parse_scalar(const std::string& s, double& out) {
  if (s.empty()) return false;
  char* end = nullptr;
  double d = std::strtod(s.c_str(), &end);
  if (*end != '\0') return false;
  out = d;
  return true;
}
bool parse_scalar(const std::string& s, bool& out) {
  if (s == "true" || s == "True" || s == "yes" || s == "on") return out = true, true;
  if (s == "false" || s == "False" || s == "no" || s == "off") return out = false, true;
  return false;
}
bool parse_scalar(const std::string& s, std::string& out) {
  out = s;
  return true;
}

// Reads declared keys out of a YAML tree, remembering which were used so that leftovers are
// reported as unknown keys.
class Binder {
 public:
  Binder(YAML::Node root, std::string file, std::set<std::string> overridden, Config& cfg)
      : root_(std::move(root)), file_(std::move(file)), overridden_(std::move(overridden)), cfg_(cfg) {}

  template <typename T>
  void required(const std::string& key, T& out) {
    bind(key, out, true);
  }
  template <typename T>
  void optional(const std::string& key, T& out) {
    bind(key, out, false);
  }

  // A list of strings: a YAML sequence of scalars, or one scalar with comma-separated items.
  void optional(const std::string& key, std::vector<std::string>& out) {
    known_.insert(key);
    YAML::Node node = find(key);
    if (!node.IsDefined() || node.IsNull()) return;
    out.clear();
    if (node.IsScalar()) {
      std::stringstream ss(node.Scalar());
      for (std::string item; std::getline(ss, item, ',');) {
        item.erase(0, item.find_first_not_of(" \t"));
        item.erase(item.find_last_not_of(" \t") + 1);
        if (!item.empty()) out.push_back(item);
      }
    } else {
      DSV3_CHECK(node.IsSequence(), where(key, node), ": key '", key,
                 "' must be a list of names, got a mapping");
      for (const auto& item : node) {
        DSV3_CHECK(item.IsScalar(), where(key, item), ": key '", key, "' must be a list of names");
        out.push_back(item.Scalar());
      }
    }
    const auto m = node.Mark();
    cfg_.lines[key] = overridden_.count(key) ? 0 : m.line + 1;
  }

  // Any key in the tree that was not bound is unknown.
  void reject_unknown() const { walk(root_, ""); }

 private:
  std::string where(const std::string& key, const YAML::Node& n) const {
    if (overridden_.count(key)) return file_ + " (--set " + key + ")";
    const auto m = n.Mark();
    return m.line >= 0 ? file_ + ":" + std::to_string(m.line + 1) : file_;
  }

  template <typename T>
  void bind(const std::string& key, T& out, bool required) {
    known_.insert(key);
    YAML::Node node = find(key);
    if (!node.IsDefined() || node.IsNull()) {
      DSV3_CHECK(!required, file_, ": missing required key '", key, "'");
      return;
    }
    DSV3_CHECK(node.IsScalar(), where(key, node), ": key '", key, "' must be ", type_name(&out), ", got a ",
               node.IsMap() ? "mapping" : "sequence");
    const std::string text = node.Scalar();
    DSV3_CHECK(parse_scalar(text, out), where(key, node), ": key '", key, "' must be ", type_name(&out),
               ", got '", text, "'");
    const auto m = node.Mark();
    cfg_.lines[key] = overridden_.count(key) ? 0 : m.line + 1;
  }

  YAML::Node find(const std::string& key) const {
    std::vector<std::string> parts;
    std::stringstream ss(key);
    for (std::string part; std::getline(ss, part, '.');) parts.push_back(part);
    return find_in(root_, parts, 0, key);
  }

  // yaml-cpp nodes are handles with reference semantics; walk by recursion on const nodes only, so
  // that nothing is inserted and no handle is re-seated.
  YAML::Node find_in(const YAML::Node& node, const std::vector<std::string>& parts, size_t i,
                     const std::string& key) const {
    if (i == parts.size()) return node;
    if (!node.IsDefined() || node.IsNull()) return YAML::Node(YAML::NodeType::Undefined);
    std::string prefix;
    for (size_t j = 0; j < i; ++j) prefix += (j ? "." : "") + parts[j];
    DSV3_CHECK(node.IsMap(), where(prefix, node), ": '", prefix, "' must be a mapping (it holds '", key,
               "')");
    const YAML::Node child = node[parts[i]];
    if (!child.IsDefined()) return YAML::Node(YAML::NodeType::Undefined);
    return find_in(child, parts, i + 1, key);
  }

  void walk(const YAML::Node& node, const std::string& prefix) const {
    if (node.IsMap()) {
      for (const auto& kv : node) {
        const std::string k = kv.first.as<std::string>();
        const std::string full = prefix.empty() ? k : prefix + "." + k;
        if (known_.count(full)) continue;
        bool is_section = std::any_of(known_.begin(), known_.end(),
                                      [&](const std::string& s) { return s.rfind(full + ".", 0) == 0; });
        DSV3_CHECK(is_section, where(full, kv.first), ": unknown key '", full, "'", suggestion(full));
        walk(kv.second, full);
      }
    } else if (!prefix.empty() && !known_.count(prefix)) {
      raise(where(prefix, node), ": key '", prefix, "' is a section and must be a mapping");
    }
  }

  // "did you mean" for a misspelt key: the known key with the same parent and smallest edit distance.
  std::string suggestion(const std::string& key) const {
    auto dist = [](const std::string& a, const std::string& b) {
      std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
      for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
      for (size_t i = 1; i <= a.size(); ++i) {
        cur[0] = i;
        for (size_t j = 1; j <= b.size(); ++j)
          cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
        std::swap(prev, cur);
      }
      return prev[b.size()];
    };
    std::string best;
    size_t best_d = 4;
    for (const auto& k : known_) {
      size_t d = dist(k, key);
      if (d < best_d) best_d = d, best = k;
    }
    return best.empty() ? "" : " (did you mean '" + best + "'?)";
  }

  YAML::Node root_;
  std::string file_;
  std::set<std::string> overridden_;
  Config& cfg_;
  std::set<std::string> known_;
};

// Collects every declared key with its current value as text, for comparisons and reports.
class Lister {
 public:
  template <typename T>
  void required(const std::string& key, const T& v) {
    items.emplace_back(key, text(v));
  }
  template <typename T>
  void optional(const std::string& key, const T& v) {
    items.emplace_back(key, text(v));
  }
  std::vector<std::pair<std::string, std::string>> items;

 private:
  static std::string text(int64_t v) { return std::to_string(v); }
  static std::string text(bool v) { return v ? "true" : "false"; }
  static std::string text(const std::string& v) { return v; }
  static std::string text(const std::vector<std::string>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + v[i];
    return s + "]";
  }
  static std::string text(double v) {  // the shortest text that reads back as the same double
    char b[40];
    for (int prec = 6; prec <= 17; ++prec) {
      std::snprintf(b, sizeof b, "%.*g", prec, v);
      if (std::strtod(b, nullptr) == v) break;
    }
    return b;
  }
};

// The one list of keys. Required keys are those without which a model cannot be built. Visited by
// the loader (Binder) and by config_items (Lister), so the two cannot disagree.
template <typename Visitor, typename C>
void bind_all(Visitor& b, C& c) {
  b.required("name", c.name);
  b.optional("description", c.description);

  auto& m = c.model;
  b.required("model.vocab_size", m.vocab_size);
  b.required("model.d_model", m.d_model);
  b.required("model.num_layers", m.num_layers);
  b.optional("model.num_dense_layers", m.num_dense_layers);
  b.required("model.num_heads", m.num_heads);
  b.optional("model.ffn_dim", m.ffn_dim);
  b.required("model.context_length", m.context_length);
  b.optional("model.norm_eps", m.norm_eps);
  b.optional("model.init_method_std", m.init_method_std);
  b.required("model.mla.d_latent", m.mla.d_latent);
  b.optional("model.mla.q_lora_rank", m.mla.q_lora_rank);
  b.required("model.mla.qk_nope_head_dim", m.mla.qk_nope_head_dim);
  b.required("model.mla.qk_rope_head_dim", m.mla.qk_rope_head_dim);
  b.required("model.mla.v_head_dim", m.mla.v_head_dim);
  b.optional("model.mla.use_fp8_kv", m.mla.use_fp8_kv);
  b.optional("model.rope.theta", m.rope.theta);
  b.optional("model.rope.scaling", m.rope.scaling);
  b.optional("model.rope.factor", m.rope.factor);
  b.optional("model.rope.original_context_length", m.rope.original_context_length);
  b.optional("model.rope.beta_fast", m.rope.beta_fast);
  b.optional("model.rope.beta_slow", m.rope.beta_slow);
  b.optional("model.rope.mscale", m.rope.mscale);
  b.optional("model.rope.mscale_all_dim", m.rope.mscale_all_dim);
  b.required("model.moe.num_experts", m.moe.num_experts);
  b.required("model.moe.num_experts_per_token", m.moe.num_experts_per_token);
  b.optional("model.moe.num_shared_experts", m.moe.num_shared_experts);
  b.required("model.moe.expert_dim", m.moe.expert_dim);
  b.optional("model.moe.num_groups", m.moe.num_groups);
  b.optional("model.moe.topk_groups", m.moe.topk_groups);
  b.optional("model.moe.score_func", m.moe.score_func);
  b.optional("model.moe.route_scale", m.moe.route_scale);
  b.optional("model.moe.norm_topk_prob", m.moe.norm_topk_prob);
  b.optional("model.moe.aux_loss_free", m.moe.aux_loss_free);
  b.optional("model.moe.bias_update_speed", m.moe.bias_update_speed);
  b.optional("model.moe.seq_aux_alpha", m.moe.seq_aux_alpha);
  b.optional("model.moe.capacity_factor", m.moe.capacity_factor);
  b.optional("model.moe.deep_ep_fp8", m.moe.deep_ep_fp8);
  b.optional("model.mtp.depth", m.mtp.depth);
  b.optional("model.mtp.loss_weight", m.mtp.loss_weight);

  auto& t = c.training;
  b.optional("training.micro_batch_size", t.micro_batch_size);
  b.optional("training.global_batch_size", t.global_batch_size);
  b.required("training.seq_length", t.seq_length);
  b.optional("training.train_steps", t.train_steps);
  b.optional("training.precision", t.precision);
  b.optional("training.use_fp8", t.use_fp8);
  b.optional("training.fp8_passes", t.fp8_passes);
  b.optional("training.fp8_modules", t.fp8_modules);
  b.optional("training.fp8_operands", t.fp8_operands);
  b.optional("training.fp8_rounding", t.fp8_rounding);
  b.optional("training.recompute", t.recompute);
  b.optional("training.recompute_modules", t.recompute_modules);
  b.optional("training.seed", t.seed);
  b.optional("training.log_interval", t.log_interval);
  b.optional("training.eval_interval", t.eval_interval);
  b.optional("training.eval_iters", t.eval_iters);
  b.optional("training.max_nonfinite_steps", t.max_nonfinite_steps);
  b.optional("training.optimizer.type", t.optimizer.type);
  b.optional("training.optimizer.lr", t.optimizer.lr);
  b.optional("training.optimizer.min_lr", t.optimizer.min_lr);
  b.optional("training.optimizer.beta1", t.optimizer.beta1);
  b.optional("training.optimizer.beta2", t.optimizer.beta2);
  b.optional("training.optimizer.eps", t.optimizer.eps);
  b.optional("training.optimizer.weight_decay", t.optimizer.weight_decay);
  b.optional("training.optimizer.grad_clip", t.optimizer.grad_clip);
  b.optional("training.optimizer.moment_dtype", t.optimizer.moment_dtype);
  b.optional("training.schedule.style", t.schedule.style);
  b.optional("training.schedule.warmup_steps", t.schedule.warmup_steps);
  b.optional("training.schedule.constant_steps", t.schedule.constant_steps);

  auto& p = c.parallel;
  b.optional("parallel.tp", p.tp);
  b.optional("parallel.pp", p.pp);
  b.optional("parallel.ep", p.ep);
  b.optional("parallel.dp", p.dp);
  b.optional("parallel.expert_tp", p.expert_tp);
  b.optional("parallel.zero_stage", p.zero_stage);
  b.optional("parallel.sequence_parallel", p.sequence_parallel);
  b.optional("parallel.virtual_stages", p.virtual_stages);
  b.optional("parallel.last_stage_layers", p.last_stage_layers);
  b.optional("parallel.order", p.order);

  auto& h = c.hardware;
  b.optional("hardware.gpu_type", h.gpu_type);
  b.optional("hardware.gpu_memory_gb", h.gpu_memory_gb);
  b.optional("hardware.gpus_min", h.gpus_min);
  b.optional("hardware.gpus_recommended", h.gpus_recommended);
  b.optional("hardware.gpus_max", h.gpus_max);
  b.optional("hardware.peak_tflops", h.peak_tflops);
  b.optional("hardware.assumed_mfu", h.assumed_mfu);
  b.optional("hardware.nvlink_gbps", h.nvlink_gbps);
  b.optional("hardware.ib_gbps", h.ib_gbps);
  b.optional("hardware.gpus_per_node", h.gpus_per_node);
  b.optional("hardware.comm_overlap", h.comm_overlap);
  b.optional("hardware.quoted_tokens_per_s", h.quoted_tokens_per_s);
  b.optional("hardware.quoted_gpus", h.quoted_gpus);

  b.optional("checkpoint.dir", c.checkpoint.dir);
  b.optional("checkpoint.interval", c.checkpoint.interval);
  b.optional("checkpoint.keep_last", c.checkpoint.keep_last);
  b.optional("checkpoint.async", c.checkpoint.async);

  b.optional("data.path", c.data.path);
  b.optional("data.tokenizer", c.data.tokenizer);
  b.optional("data.valid_fraction", c.data.valid_fraction);
}

void set_in(YAML::Node node, const std::vector<std::string>& parts, size_t i, const YAML::Node& value,
            const std::string& assignment, const std::string& file) {
  const std::string& k = parts[i];
  if (i + 1 == parts.size()) {
    node[k] = value;
    return;
  }
  const YAML::Node& cnode = node;
  const YAML::Node existing = cnode[k];
  if (existing.IsDefined() && !existing.IsNull()) {
    DSV3_CHECK(existing.IsMap(), file, ": --set '", assignment, "': '", k, "' is not a section");
  } else {
    node[k] = YAML::Node(YAML::NodeType::Map);
  }
  set_in(node[k], parts, i + 1, value, assignment, file);
}

// Sets a dotted key in the tree to a YAML value parsed from text (so "true", "3", "1e-4" keep their
// natural types). Returns the key.
std::string apply_override(YAML::Node& root, const std::string& assignment, const std::string& file) {
  const auto eq = assignment.find('=');
  DSV3_CHECK(eq != std::string::npos && eq > 0, file, ": --set '", assignment,
             "' must have the form key=value (e.g. training.seq_length=2048)");
  const std::string key = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);
  std::vector<std::string> parts;
  std::stringstream ss(key);
  for (std::string part; std::getline(ss, part, '.');) {
    DSV3_CHECK(!part.empty(), file, ": --set '", assignment, "' has an empty key component");
    parts.push_back(part);
  }
  YAML::Node value_node;
  try {
    value_node = YAML::Load(value);
  } catch (const YAML::Exception&) {
    value_node = YAML::Node(value);
  }
  if (!value_node.IsDefined() || value_node.IsNull()) value_node = YAML::Node(value);
  set_in(root, parts, 0, value_node, assignment, file);
  return key;
}

}  // namespace

void validate(const Config& c) {
  const auto& m = c.model;
  auto positive = [&](const char* key, double v) {
    DSV3_CHECK(v > 0, c.where(key), " must be positive, got ", v);
  };
  auto non_negative = [&](const char* key, double v) {
    DSV3_CHECK(v >= 0, c.where(key), " must not be negative, got ", v);
  };
  auto one_of = [&](const char* key, const std::string& v, std::initializer_list<const char*> allowed) {
    std::string list;
    for (const char* a : allowed) {
      if (v == a) return;
      list += list.empty() ? a : std::string(", ") + a;
    }
    raise(c.where(key), " must be one of {", list, "}, got '", v, "'");
  };

  positive("model.vocab_size", m.vocab_size);
  positive("model.d_model", m.d_model);
  positive("model.num_layers", m.num_layers);
  positive("model.num_heads", m.num_heads);
  positive("model.context_length", m.context_length);
  positive("model.norm_eps", m.norm_eps);
  positive("model.init_method_std", m.init_method_std);
  non_negative("model.num_dense_layers", m.num_dense_layers);
  DSV3_CHECK(m.num_dense_layers <= m.num_layers, c.where("model.num_dense_layers"), " (", m.num_dense_layers,
             ") must not exceed model.num_layers (", m.num_layers, ")");
  if (m.num_dense_layers > 0) positive("model.ffn_dim", m.ffn_dim);

  positive("model.mla.d_latent", m.mla.d_latent);
  DSV3_CHECK(m.mla.d_latent < m.d_model, c.where("model.mla.d_latent"), " (", m.mla.d_latent,
             ") must be smaller than model.d_model (", m.d_model, ")");
  non_negative("model.mla.q_lora_rank", m.mla.q_lora_rank);
  DSV3_CHECK(m.mla.q_lora_rank < m.d_model, c.where("model.mla.q_lora_rank"), " (", m.mla.q_lora_rank,
             ") must be smaller than model.d_model (", m.d_model, ")");
  positive("model.mla.qk_nope_head_dim", m.mla.qk_nope_head_dim);
  positive("model.mla.qk_rope_head_dim", m.mla.qk_rope_head_dim);
  DSV3_CHECK(m.mla.qk_rope_head_dim % 2 == 0, c.where("model.mla.qk_rope_head_dim"),
             " must be even (RoPE rotates pairs), got ", m.mla.qk_rope_head_dim);
  positive("model.mla.v_head_dim", m.mla.v_head_dim);

  positive("model.rope.theta", m.rope.theta);
  one_of("model.rope.scaling", m.rope.scaling, {"none", "yarn"});
  if (m.rope.scaling == "yarn") {
    DSV3_CHECK(m.rope.factor >= 1.0, c.where("model.rope.factor"), " must be >= 1 for YaRN, got ",
               m.rope.factor);
    positive("model.rope.original_context_length", m.rope.original_context_length);
    DSV3_CHECK(m.rope.beta_fast > m.rope.beta_slow, c.where("model.rope.beta_fast"), " (", m.rope.beta_fast,
               ") must exceed model.rope.beta_slow (", m.rope.beta_slow, ")");
  }

  const auto& e = m.moe;
  if (m.num_moe_layers() > 0) {
    positive("model.moe.num_experts", e.num_experts);
    positive("model.moe.num_experts_per_token", e.num_experts_per_token);
    positive("model.moe.expert_dim", e.expert_dim);
    positive("model.moe.num_groups", e.num_groups);
    positive("model.moe.topk_groups", e.topk_groups);
    non_negative("model.moe.num_shared_experts", e.num_shared_experts);
    DSV3_CHECK(e.num_experts % e.num_groups == 0, c.where("model.moe.num_groups"), ": ", e.num_experts,
               " experts do not split into ", e.num_groups, " equal groups");
    DSV3_CHECK(e.topk_groups <= e.num_groups, c.where("model.moe.topk_groups"), " (", e.topk_groups,
               ") must not exceed model.moe.num_groups (", e.num_groups, ")");
    const int64_t reachable = e.num_experts / e.num_groups * e.topk_groups;
    DSV3_CHECK(e.num_experts_per_token <= reachable, c.where("model.moe.num_experts_per_token"), " (",
               e.num_experts_per_token, ") exceeds the experts reachable in ", e.topk_groups, " of ",
               e.num_groups, " groups (", reachable, ")");
    if (e.num_groups > 1 && e.score_func == "sigmoid")
      DSV3_CHECK(e.num_experts / e.num_groups >= 2, c.where("model.moe.num_groups"),
                 ": group scores sum the top-2 experts of a group, so each group needs >= 2 experts");
    one_of("model.moe.score_func", e.score_func, {"sigmoid", "softmax"});
    positive("model.moe.route_scale", e.route_scale);
    non_negative("model.moe.bias_update_speed", e.bias_update_speed);
    non_negative("model.moe.seq_aux_alpha", e.seq_aux_alpha);
    DSV3_CHECK(e.capacity_factor == 0 || e.capacity_factor >= 1.0, c.where("model.moe.capacity_factor"),
               " must be 0 (no dropping) or >= 1, got ", e.capacity_factor);
  }
  non_negative("model.mtp.depth", m.mtp.depth);
  non_negative("model.mtp.loss_weight", m.mtp.loss_weight);

  const auto& t = c.training;
  positive("training.micro_batch_size", t.micro_batch_size);
  positive("training.global_batch_size", t.global_batch_size);
  positive("training.seq_length", t.seq_length);
  DSV3_CHECK(t.seq_length <= m.context_length, c.where("training.seq_length"), " (", t.seq_length,
             ") exceeds model.context_length (", m.context_length, ")");
  DSV3_CHECK(t.global_batch_size % t.micro_batch_size == 0, c.where("training.global_batch_size"), " (",
             t.global_batch_size, ") must be a multiple of training.micro_batch_size (", t.micro_batch_size,
             ")");
  non_negative("training.train_steps", t.train_steps);
  one_of("training.precision", t.precision, {"fp32", "bf16"});
  // FP8 GEMMs, caches and dispatch live inside a bf16 run (DeepSeek-V3's framework is BF16 + FP8);
  // fp32 with FP8 parts is not implemented.
  for (const auto& [key, on] : {std::pair<const char*, bool>{"training.use_fp8", t.use_fp8},
                                {"model.mla.use_fp8_kv", c.model.mla.use_fp8_kv},
                                {"model.moe.deep_ep_fp8", c.model.moe.deep_ep_fp8}})
    DSV3_CHECK(!on || t.precision == "bf16", c.where(key), ": true needs training.precision: bf16 (got ",
               t.precision, "): FP8 runs inside bf16 mixed precision");
  // The FP8 GEMM lists: which passes, which projections.
  struct Fp8List {
    const char* key;
    const std::vector<std::string>& list;
    const char* what;   // one entry
    const char* whats;  // several
    std::vector<std::string> known;
  };
  for (const Fp8List& l :
       {Fp8List{"training.fp8_passes", t.fp8_passes, "pass", "passes", {"fprop", "dgrad", "wgrad"}},
        Fp8List{"training.fp8_modules", t.fp8_modules, "module", "modules", {"attention", "ffn"}},
        Fp8List{"training.fp8_operands",
                t.fp8_operands,
                "operand",
                "operands",
                {"activations", "weights", "gradients"}}}) {
    if (!c.lines.count(l.key)) continue;
    const std::string where = c.where(l.key);
    DSV3_CHECK(t.use_fp8, where, ": a list of FP8 ", l.whats, " needs training.use_fp8: true");
    DSV3_CHECK(!l.list.empty(), where, ": an empty list (for no FP8 GEMMs set training.use_fp8: false)");
    std::string names;
    for (const std::string& k : l.known) names += (names.empty() ? "" : ", ") + k;
    for (size_t i = 0; i < l.list.size(); ++i) {
      const std::string& p = l.list[i];
      DSV3_CHECK(std::find(l.known.begin(), l.known.end(), p) != l.known.end(), where, ": unknown ", l.what,
                 " '", p, "' (known: ", names, ")");
      for (size_t j = 0; j < i; ++j) DSV3_CHECK(l.list[j] != p, where, ": '", p, "' is listed twice");
    }
  }
  // The FP8 KV cache and FP8 dispatch keep activations as E4M3 codes: an ablation that leaves the
  // GEMMs' activations unquantized cannot have them.
  if (!t.fp8_operands.empty() &&
      std::find(t.fp8_operands.begin(), t.fp8_operands.end(), "activations") == t.fp8_operands.end())
    for (const auto& [key, on] :
         {std::pair<const char*, bool>{"model.mla.use_fp8_kv", c.model.mla.use_fp8_kv},
          {"model.moe.deep_ep_fp8", c.model.moe.deep_ep_fp8}})
      DSV3_CHECK(!on, c.where("training.fp8_operands"), ": a list without activations needs ", key,
                 ": false (it keeps activations as E4M3 codes)");
  one_of("training.fp8_rounding", t.fp8_rounding, {"nearest", "stochastic"});
  if (t.fp8_rounding == "stochastic") {
    DSV3_CHECK(t.use_fp8, c.where("training.fp8_rounding"), ": stochastic needs training.use_fp8: true");
    // The caches' codes are the FP8 kernels', rounded to nearest.
    for (const auto& [key, on] :
         {std::pair<const char*, bool>{"model.mla.use_fp8_kv", c.model.mla.use_fp8_kv},
          {"model.moe.deep_ep_fp8", c.model.moe.deep_ep_fp8}})
      DSV3_CHECK(!on, c.where("training.fp8_rounding"), ": stochastic needs ", key,
                 ": false (its E4M3 codes are rounded to nearest)");
  }
  one_of("training.recompute", t.recompute, {"none", "selective", "full"});
  DSV3_CHECK(t.recompute_modules.empty() || t.recompute == "selective", c.where("training.recompute_modules"),
             ": a module list needs training.recompute: selective (got ", t.recompute, ")");
  for (size_t i = 0; i < t.recompute_modules.size(); ++i) {
    const std::string& mod = t.recompute_modules[i];
    const auto& names = recompute_module_names();
    std::string known;
    for (const auto& n : names) known += (known.empty() ? "" : ", ") + n;
    DSV3_CHECK(std::find(names.begin(), names.end(), mod) != names.end(),
               c.where("training.recompute_modules"), ": unknown module '", mod, "' (known: ", known, ")");
    for (size_t j = 0; j < i; ++j)
      DSV3_CHECK(t.recompute_modules[j] != mod, c.where("training.recompute_modules"), ": '", mod,
                 "' is listed twice");
  }
  positive("training.log_interval", t.log_interval);
  non_negative("training.eval_interval", t.eval_interval);
  non_negative("training.eval_iters", t.eval_iters);
  positive("training.max_nonfinite_steps", t.max_nonfinite_steps);
  one_of("training.optimizer.type", t.optimizer.type, {"adamw"});
  one_of("training.optimizer.moment_dtype", t.optimizer.moment_dtype, {"fp32", "bf16"});
  positive("training.optimizer.lr", t.optimizer.lr);
  non_negative("training.optimizer.min_lr", t.optimizer.min_lr);
  DSV3_CHECK(t.optimizer.min_lr <= t.optimizer.lr, c.where("training.optimizer.min_lr"), " (",
             t.optimizer.min_lr, ") must not exceed training.optimizer.lr (", t.optimizer.lr, ")");
  DSV3_CHECK(t.optimizer.beta1 >= 0 && t.optimizer.beta1 < 1, c.where("training.optimizer.beta1"),
             " must be in [0, 1), got ", t.optimizer.beta1);
  DSV3_CHECK(t.optimizer.beta2 >= 0 && t.optimizer.beta2 < 1, c.where("training.optimizer.beta2"),
             " must be in [0, 1), got ", t.optimizer.beta2);
  positive("training.optimizer.eps", t.optimizer.eps);
  non_negative("training.optimizer.weight_decay", t.optimizer.weight_decay);
  non_negative("training.optimizer.grad_clip", t.optimizer.grad_clip);
  one_of("training.schedule.style", t.schedule.style, {"cosine", "constant_cosine", "constant"});
  non_negative("training.schedule.warmup_steps", t.schedule.warmup_steps);
  non_negative("training.schedule.constant_steps", t.schedule.constant_steps);

  const auto& p = c.parallel;
  positive("parallel.tp", p.tp);
  positive("parallel.pp", p.pp);
  positive("parallel.ep", p.ep);
  non_negative("parallel.dp", p.dp);
  positive("parallel.expert_tp", p.expert_tp);
  positive("parallel.virtual_stages", p.virtual_stages);
  non_negative("parallel.last_stage_layers", p.last_stage_layers);
  DSV3_CHECK(p.zero_stage >= 0 && p.zero_stage <= 2, c.where("parallel.zero_stage"),
             " must be 0, 1 or 2, got ", p.zero_stage);
  {
    // The order names each of tp, ep, dp, pp once.
    std::set<std::string> seen;
    std::stringstream ss(p.order);
    for (std::string part; std::getline(ss, part, '-');) {
      DSV3_CHECK(part == "tp" || part == "ep" || part == "dp" || part == "pp", c.where("parallel.order"),
                 ": unknown dimension '", part, "' in '", p.order, "' (use tp, ep, dp, pp joined by '-')");
      DSV3_CHECK(seen.insert(part).second, c.where("parallel.order"), ": '", part, "' appears twice in '",
                 p.order, "'");
    }
    DSV3_CHECK(seen.size() == 4, c.where("parallel.order"), " must name tp, ep, dp and pp, got '", p.order,
               "'");
  }

  const auto& h = c.hardware;
  positive("hardware.gpu_memory_gb", h.gpu_memory_gb);
  positive("hardware.gpus_min", h.gpus_min);
  DSV3_CHECK(h.gpus_recommended >= h.gpus_min, c.where("hardware.gpus_recommended"), " (", h.gpus_recommended,
             ") must be >= hardware.gpus_min (", h.gpus_min, ")");
  DSV3_CHECK(h.gpus_max == 0 || h.gpus_max >= h.gpus_recommended, c.where("hardware.gpus_max"), " (",
             h.gpus_max, ") must be 0 (no bound) or >= hardware.gpus_recommended (", h.gpus_recommended, ")");
  positive("hardware.peak_tflops", h.peak_tflops);
  DSV3_CHECK(h.assumed_mfu > 0 && h.assumed_mfu <= 1, c.where("hardware.assumed_mfu"),
             " must be in (0, 1], got ", h.assumed_mfu);

  non_negative("hardware.quoted_tokens_per_s", h.quoted_tokens_per_s);
  non_negative("hardware.nvlink_gbps", h.nvlink_gbps);
  non_negative("hardware.ib_gbps", h.ib_gbps);
  non_negative("hardware.gpus_per_node", double(h.gpus_per_node));
  DSV3_CHECK(h.comm_overlap >= 0 && h.comm_overlap <= 1, c.where("hardware.comm_overlap"),
             " must be in [0, 1], got ", h.comm_overlap);
  if (h.quoted_tokens_per_s > 0) positive("hardware.quoted_gpus", double(h.quoted_gpus));

  positive("checkpoint.interval", c.checkpoint.interval);
  positive("checkpoint.keep_last", c.checkpoint.keep_last);
  one_of("data.tokenizer", c.data.tokenizer, {"byte"});
  DSV3_CHECK(c.data.valid_fraction >= 0 && c.data.valid_fraction < 1, c.where("data.valid_fraction"),
             " must be in [0, 1), got ", c.data.valid_fraction);

  // The configured layout must divide the model even before the world size is known.
  Layout l;
  l.tp = p.tp, l.pp = p.pp, l.ep = p.ep, l.dp = p.dp > 0 ? p.dp : 0, l.expert_tp = p.expert_tp;
  l.zero_stage = p.zero_stage, l.sequence_parallel = p.sequence_parallel, l.virtual_stages = p.virtual_stages;
  l.last_stage_layers = p.last_stage_layers;
  check_layout(c, l);
}

void check_layout(const Config& c, const Layout& l) {
  const auto& m = c.model;
  const std::string f = c.source_path;
  DSV3_CHECK(m.num_heads % l.tp == 0, f, ": layout tp=", l.tp,
             " does not divide model.num_heads=", m.num_heads);
  DSV3_CHECK(m.vocab_size % l.tp == 0, f, ": layout tp=", l.tp,
             " does not divide model.vocab_size=", m.vocab_size, " (vocab-parallel embedding and head)");
  if (m.num_dense_layers > 0)
    DSV3_CHECK(m.ffn_dim % l.tp == 0, f, ": layout tp=", l.tp, " does not divide model.ffn_dim=", m.ffn_dim);
  DSV3_CHECK(m.num_layers >= l.pp, f, ": layout pp=", l.pp, " exceeds model.num_layers=", m.num_layers,
             " (every pipeline stage needs a layer)");
  if (l.last_stage_layers > 0) {
    const int64_t stages = l.pp * l.virtual_stages;
    DSV3_CHECK(stages > 1, f, ": parallel.last_stage_layers=", l.last_stage_layers,
               " needs pipeline stages (pp > 1)");
    DSV3_CHECK(m.num_layers - l.last_stage_layers >= stages - 1, f,
               ": parallel.last_stage_layers=", l.last_stage_layers, " leaves ",
               m.num_layers - l.last_stage_layers, " of model.num_layers=", m.num_layers, " for the other ",
               stages - 1, " pipeline stages (each needs a layer)");
  }
  if (l.virtual_stages > 1) {
    DSV3_CHECK(l.pp > 1, f, ": parallel.virtual_stages=", l.virtual_stages,
               " needs pipeline stages (pp > 1)");
    DSV3_CHECK(m.num_layers >= l.pp * l.virtual_stages, f, ": pp*virtual_stages=", l.pp, "*",
               l.virtual_stages, " exceeds model.num_layers=", m.num_layers,
               " (every model chunk needs a layer)");
  }
  if (m.num_moe_layers() > 0) {
    DSV3_CHECK(m.moe.num_experts % l.ep == 0, f, ": layout ep=", l.ep,
               " does not divide model.moe.num_experts=", m.moe.num_experts);
    DSV3_CHECK(m.moe.expert_dim % l.expert_tp == 0, f, ": layout expert_tp=", l.expert_tp,
               " does not divide model.moe.expert_dim=", m.moe.expert_dim);
    if (m.moe.num_shared_experts > 0)
      DSV3_CHECK(m.moe.expert_dim * m.moe.num_shared_experts % l.tp == 0, f, ": layout tp=", l.tp,
                 " does not divide the shared-expert width ", m.moe.expert_dim * m.moe.num_shared_experts);
  }
  if (l.dp > 0) {
    DSV3_CHECK((l.dp * l.tp) % (l.ep * l.expert_tp) == 0, f, ": ep*expert_tp=", l.ep * l.expert_tp,
               " must divide dp*tp=", l.dp * l.tp, " (layout tp=", l.tp, " pp=", l.pp, " dp=", l.dp,
               " ep=", l.ep, ")");
    const auto& t = c.training;
    DSV3_CHECK(t.global_batch_size % (t.micro_batch_size * l.dp) == 0, f,
               ": training.global_batch_size=", t.global_batch_size,
               " is not a multiple of micro_batch_size*dp=", t.micro_batch_size, "*", l.dp);
    if (l.virtual_stages > 1)
      DSV3_CHECK(t.global_batch_size / (t.micro_batch_size * l.dp) % l.pp == 0, f,
                 ": the interleaved schedule needs the micro-batches per pipeline (global_batch_size / "
                 "(micro_batch_size*dp) = ",
                 t.global_batch_size / (t.micro_batch_size * l.dp), ") to be a multiple of pp=", l.pp);
  }
}

Layout resolve_layout(const Config& c, int64_t world) {
  const auto& p = c.parallel;
  Layout l;
  l.tp = p.tp, l.pp = p.pp, l.ep = p.ep, l.expert_tp = p.expert_tp, l.zero_stage = p.zero_stage;
  l.sequence_parallel = p.sequence_parallel;
  l.virtual_stages = p.virtual_stages;
  l.last_stage_layers = p.last_stage_layers;
  if (world <= 0) {
    l.dp = p.dp > 0 ? p.dp : 1;
  } else {
    DSV3_CHECK(world % (p.tp * p.pp) == 0, c.source_path, ": world size ", world,
               " is not divisible by tp*pp=", p.tp, "*", p.pp);
    l.dp = world / (p.tp * p.pp);
    DSV3_CHECK(p.dp == 0 || p.dp == l.dp, c.source_path, ": world size ", world, " != tp*pp*dp = ", p.tp, "*",
               p.pp, "*", p.dp, " = ", p.tp * p.pp * p.dp);
  }
  check_layout(c, l);
  return l;
}

Config load_config_from_string(const std::string& yaml, const std::string& file,
                               const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& ex) {
    raise(file, ":", ex.mark.line + 1, ": YAML syntax error: ", ex.msg);
  }
  DSV3_CHECK(root.IsMap(), file, ": the top level must be a mapping of sections (model, training, ...)");
  std::set<std::string> overridden;
  for (const auto& o : overrides) overridden.insert(apply_override(root, o, file));

  Config cfg;
  cfg.source_path = file;
  Binder binder(root, file, overridden, cfg);
  try {
    bind_all(binder, cfg);
    binder.reject_unknown();
  } catch (const YAML::Exception& ex) {
    raise(file, ":", ex.mark.line + 1, ": ", ex.msg);
  }
  YAML::Emitter out;
  out << root;
  cfg.yaml_text = out.c_str();
  validate(cfg);
  return cfg;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  DSV3_CHECK(in.good(), path, ": cannot open config file");
  std::stringstream ss;
  ss << in.rdbuf();
  return load_config_from_string(ss.str(), path, overrides);
}

std::vector<std::pair<std::string, std::string>> config_items(const Config& c) {
  Lister l;
  bind_all(l, c);
  return l.items;
}

std::string config_dir() {
  if (const char* env = std::getenv("DSV3_CONFIG_DIR")) return env;
  if (fs::is_directory("configs")) return "configs";
  return std::string(DSV3_SOURCE_DIR) + "/configs";
}

std::string resolve_config_path(const std::string& name) {
  if (name.find('/') != std::string::npos || (name.size() > 5 && name.substr(name.size() - 5) == ".yaml")) {
    DSV3_CHECK(fs::exists(name), name, ": no such config file");
    return name;
  }
  std::string stem = name;
  std::transform(stem.begin(), stem.end(), stem.begin(), ::tolower);
  if (stem.rfind("deepseek_v3_", 0) != 0) stem = "deepseek_v3_" + stem;
  if (stem == "deepseek_v3_671b") stem = "deepseek_v3_base";
  const std::string path = config_dir() + "/" + stem + ".yaml";
  if (!fs::exists(path)) {
    std::string known;
    for (const auto& p : list_config_paths()) known += " " + fs::path(p).stem().string();
    raise("unknown config '", name, "' (looked for ", path, "); known:", known);
  }
  return path;
}

std::vector<std::string> list_config_paths() {
  static const char* order[] = {"tiny", "1b", "5b", "10b", "15b", "20b", "base"};
  std::vector<std::string> out;
  const std::string dir = config_dir();
  std::set<std::string> seen;
  for (const char* o : order) {
    const std::string p = dir + "/deepseek_v3_" + o + ".yaml";
    if (fs::exists(p)) out.push_back(p), seen.insert(p);
  }
  if (fs::is_directory(dir)) {
    std::vector<std::string> rest;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".yaml" && !seen.count(e.path().string()))
        rest.push_back(e.path().string());
    std::sort(rest.begin(), rest.end());
    out.insert(out.end(), rest.begin(), rest.end());
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> model_config_items(const ModelConfig& m) {
  Config c;
  c.model = m;
  std::vector<std::pair<std::string, std::string>> out;
  for (auto& item : config_items(c))
    if (item.first.rfind("model.", 0) == 0) out.push_back(std::move(item));
  return out;
}

std::string precision_summary(const Config& c) {
  std::string s = c.training.precision;
  if (c.training.use_fp8) {
    s += " + fp8 gemms";
    // Partial lists, as "(fprop, wgrad only)", "(attention only)", "(fprop; ffn only)" or
    // "(activations, gradients only)".
    const auto join = [](const std::vector<std::string>& v) {
      std::string j;
      for (size_t i = 0; i < v.size(); ++i) j += (i ? ", " : "") + v[i];
      return j;
    };
    std::string parts;
    for (const auto& [list, all] :
         {std::pair<const std::vector<std::string>&, size_t>{c.training.fp8_passes, 3},
          {c.training.fp8_modules, 2},
          {c.training.fp8_operands, 3}})
      if (!list.empty() && list.size() < all) parts += (parts.empty() ? "" : "; ") + join(list);
    if (!parts.empty()) s += " (" + parts + " only)";
    if (c.training.fp8_rounding == "stochastic") s += ", stochastic rounding";
  }
  if (c.model.mla.use_fp8_kv) s += " + fp8 kv cache";
  if (c.model.moe.deep_ep_fp8) s += " + fp8 dispatch";
  if (c.training.optimizer.moment_dtype == "bf16") s += " + bf16 moments";
  return s;
}

const std::vector<std::string>& recompute_module_names() {
  static const std::vector<std::string> names = {"norms", "mla_up_proj", "swiglu"};
  return names;
}
const std::vector<std::string>& default_recompute_modules() { return recompute_module_names(); }

RecomputeSet recompute_set(const std::string& policy, const std::vector<std::string>& modules) {
  RecomputeSet r;
  if (policy == "none") {
    DSV3_CHECK(modules.empty(), "recompute modules need the selective policy (got ", policy, ")");
    return r;
  }
  if (policy == "full") {
    DSV3_CHECK(modules.empty(), "recompute modules need the selective policy (got ", policy, ")");
    r.full = true;
    return r;
  }
  DSV3_CHECK(policy == "selective", "unknown recompute policy '", policy, "' (none, selective, full)");
  for (const std::string& m : modules.empty() ? default_recompute_modules() : modules) {
    if (m == "norms")
      r.norms = true;
    else if (m == "mla_up_proj")
      r.mla_up_proj = true;
    else if (m == "swiglu")
      r.swiglu = true;
    else
      raise("unknown recompute module '", m, "' (norms, mla_up_proj, swiglu)");
  }
  return r;
}

std::string recompute_modules_arg(const std::vector<std::string>& modules) {
  std::string s = "[";
  for (size_t i = 0; i < modules.size(); ++i) s += (i ? "," : "") + modules[i];
  return s + "]";
}

std::string RecomputeSet::text() const {
  if (full) return "full";
  std::string s;
  for (const auto& [on, name] :
       {std::pair<bool, const char*>{norms, "norms"}, {mla_up_proj, "mla_up_proj"}, {swiglu, "swiglu"}})
    if (on) s += (s.empty() ? "" : ", ") + std::string(name);
  return s.empty() ? "none" : "selective (" + s + ")";
}

}  // namespace dsv3
