// Renderings for report.hpp.
#include "config/report.hpp"

#include <cstdio>
#include <sstream>

#include "core/format.hpp"

namespace dsv3 {

namespace {
std::string pad(const std::string& s, size_t w, bool right = false) {
  if (s.size() >= w) return s;
  return right ? std::string(w - s.size(), ' ') + s : s + std::string(w - s.size(), ' ');
}
std::string short_name(const std::string& name) {
  std::string s = name.rfind("deepseek_v3_", 0) == 0 ? name.substr(12) : name;
  return s == "base" ? "671b" : s;
}
std::string gpu_range(const HardwareConfig& h) {
  if (h.gpus_max == 0) return std::to_string(h.gpus_min) + "+";
  if (h.gpus_max == h.gpus_min) return std::to_string(h.gpus_min);
  return std::to_string(h.gpus_min) + "-" + std::to_string(h.gpus_max);
}
std::string context_text(int64_t n) {
  return n % 1024 == 0 ? std::to_string(n / 1024) + "K" : std::to_string(n);
}
std::vector<std::pair<std::string, bool>> features(const Config& c) {
  const auto& m = c.model;
  return {{"FP8 KV cache", m.mla.use_fp8_kv},
          {"DeepEP FP8 dispatch", m.moe.deep_ep_fp8},
          {"multi-token prediction", m.mtp.depth > 0},
          {"aux-loss-free balancing", m.moe.aux_loss_free},
          {"FP8 training", c.training.use_fp8},
          {"shared experts", m.moe.num_shared_experts > 0},
          {"group-limited routing", m.moe.num_groups > 1},
          {"YaRN context extension", m.yarn_active()},
          {"token dropping (capacity factor)", m.moe.capacity_factor > 0}};
}
}  // namespace

std::string layout_text(const Layout& l) {
  return "tp=" + std::to_string(l.tp) + " pp=" + std::to_string(l.pp) +
         (l.virtual_stages > 1 ? " vp=" + std::to_string(l.virtual_stages) : std::string()) +
         " ep=" + std::to_string(l.ep) + " dp=" + std::to_string(l.dp) +
         " zero=" + std::to_string(l.zero_stage);
}

Layout config_layout_on(const Config& c, int64_t gpus) {
  Layout l;
  const auto& p = c.parallel;
  l.tp = p.tp, l.pp = p.pp, l.ep = p.ep, l.expert_tp = p.expert_tp, l.zero_stage = p.zero_stage;
  l.sequence_parallel = p.sequence_parallel;
  l.virtual_stages = p.virtual_stages, l.last_stage_layers = p.last_stage_layers;
  l.dp = p.dp > 0 ? p.dp : std::max<int64_t>(1, gpus / (p.tp * p.pp));
  return l;
}

nlohmann::json layout_json(const Layout& l) {
  return {{"tp", l.tp},
          {"pp", l.pp},
          {"ep", l.ep},
          {"dp", l.dp},
          {"expert_tp", l.expert_tp},
          {"zero_stage", l.zero_stage},
          {"virtual_stages", l.virtual_stages},
          {"sequence_parallel", l.sequence_parallel}};
}

nlohmann::json memory_json(const MemoryEstimate& m) {
  return {{"total_bytes", m.total()},
          {"weights_bytes", m.weights},
          {"gradients_bytes", m.gradients},
          {"optimizer_bytes", m.optimizer},
          {"activations_bytes", m.activations},
          {"moe_dispatch_bytes", m.moe_dispatch},
          {"logits_bytes", m.logits},
          {"params_on_rank", m.params_on_rank},
          {"stage", m.stage},
          {"in_flight_microbatches", m.in_flight_microbatches},
          {"assumptions", m.assumptions}};
}

nlohmann::json info_json(const Config& c) {
  const auto& m = c.model;
  const ParamCounts pc = count_parameters(m);
  const FlopsPerToken f = training_flops_per_token(m, c.training.seq_length);
  const Layout l = config_layout_on(c, c.hardware.gpus_recommended);
  const MemoryEstimate mem = memory_per_gpu(c, l, MemoryOptions::from(c));
  nlohmann::json params = nlohmann::json::object();
  for (const auto& [name, v] : pc.rows()) params[name] = {{"total", v.total}, {"active", v.active}};
  nlohmann::json feats = nlohmann::json::object();
  for (const auto& [name, on] : features(c)) feats[name] = on;
  const double gpus = double(c.hardware.gpus_recommended);
  const double tps = gpus * c.hardware.peak_tflops * 1e12 * c.hardware.assumed_mfu / f.total();
  return {
      {"name", c.name},
      {"path", c.source_path},
      {"description", c.description},
      {"total_params", pc.total()},
      {"active_params", pc.active()},
      {"mtp_params", pc.mtp.total},
      {"total_params_with_mtp", pc.total_with_mtp()},
      {"params", params},
      {"flops_per_token", f.total()},
      {"flops_per_token_matmul", f.matmul},
      {"flops_per_token_attention", f.attention},
      {"seq_length", c.training.seq_length},
      {"memory_per_gpu_bytes", mem.total()},
      {"memory", memory_json(mem)},
      {"fits_gpu_memory", mem.total() <= usable_bytes(c.hardware.gpu_memory_gb)},
      {"usable_bytes_per_gpu", usable_bytes(c.hardware.gpu_memory_gb)},
      {"min_gpus_to_fit", min_gpus_to_fit(c, c.hardware.gpu_memory_gb)},  // any layout, 0: none
      {"layout", layout_json(l)},
      {"layout_gpus", l.world()},  // tp x pp x dp of that layout
      {"architecture",
       {{"vocab_size", m.vocab_size},
        {"d_model", m.d_model},
        {"num_layers", m.num_layers},
        {"num_dense_layers", m.num_dense_layers},
        {"num_heads", m.num_heads},
        {"ffn_dim", m.ffn_dim},
        {"d_latent", m.mla.d_latent},
        {"q_lora_rank", m.mla.q_lora_rank},
        {"qk_nope_head_dim", m.mla.qk_nope_head_dim},
        {"qk_rope_head_dim", m.mla.qk_rope_head_dim},
        {"v_head_dim", m.mla.v_head_dim},
        {"num_experts", m.moe.num_experts},
        {"num_experts_per_token", m.moe.num_experts_per_token},
        {"num_shared_experts", m.moe.num_shared_experts},
        {"expert_dim", m.moe.expert_dim},
        {"num_groups", m.moe.num_groups},
        {"topk_groups", m.moe.topk_groups},
        {"mtp_depth", m.mtp.depth},
        {"context_length", m.context_length}}},
      {"hardware",
       {{"gpu_type", c.hardware.gpu_type},
        {"gpu_memory_gb", c.hardware.gpu_memory_gb},
        {"gpus_min", c.hardware.gpus_min},
        {"gpus_recommended", c.hardware.gpus_recommended},
        {"gpus_max", c.hardware.gpus_max},
        {"peak_tflops", c.hardware.peak_tflops},
        {"assumed_mfu", c.hardware.assumed_mfu}}},
      {"features", feats},
      {"estimated_tokens_per_s", tps},
      {"quoted_tokens_per_s", c.hardware.quoted_tokens_per_s},
      {"quoted_implied_mfu", c.hardware.quoted_tokens_per_s > 0
                                 ? c.hardware.quoted_tokens_per_s * f.total() /
                                       (c.hardware.quoted_gpus * c.hardware.peak_tflops * 1e12)
                                 : 0.0},
  };
}

nlohmann::json cost_json(const StepCost& s) {
  return {{"step_s", s.step_s},
          {"compute_s", s.compute_s},
          {"recompute_s", s.recompute_s},
          {"tp_s", s.tp_s},
          {"ep_s", s.ep_s},
          {"dp_s", s.dp_s},
          {"bubble_s", s.bubble_s},
          {"tokens_per_s", s.tokens_per_s},
          {"mfu", s.mfu},
          {"ep_inside_node", s.ep_inside_node},
          {"microbatches", s.microbatches}};
}

nlohmann::json plan_json(const Plan& p) {
  return {{"config", p.config_name},
          {"path", p.config_path},
          {"layout", layout_json(p.layout)},
          {"recompute", p.recompute},
          {"recompute_modules", p.recompute_modules},
          {"cost", cost_json(p.cost)},
          {"memory_per_gpu_bytes", p.memory.total()},
          {"memory", memory_json(p.memory)},
          {"relative_cost", p.relative_cost},
          {"estimated_tokens_per_s", p.tokens_per_s}};
}

nlohmann::json recommendation_json(const Recommendation& r) {
  nlohmann::json alts = nlohmann::json::array(), runners = nlohmann::json::array();
  for (const auto& a : r.alternatives) alts.push_back(plan_json(a));
  for (const auto& a : r.runner_up_layouts) runners.push_back(plan_json(a));
  return {{"recommended", r.recommended ? plan_json(*r.recommended) : nlohmann::json(nullptr)},
          {"alternatives", alts},
          {"runner_up_layouts", runners},
          {"seed_choice", r.seed_choice},
          {"reasons", r.reasons}};
}

std::string list_table(const std::vector<Config>& configs) {
  std::ostringstream os;
  const std::vector<std::pair<std::string, size_t>> cols = {
      {"Model", 6},   {"Total", 9}, {"Active", 9}, {"Layers", 7},  {"Hidden", 7}, {"Latent", 7},
      {"Experts", 8}, {"Top-K", 6}, {"GPUs", 6},   {"GPU Mem", 8}, {"Context", 8}};
  for (const auto& [h, w] : cols) os << pad(h, w) << ' ';
  os << '\n';
  for (const auto& [h, w] : cols) os << std::string(w, '-') << ' ';
  os << '\n';
  for (const auto& c : configs) {
    const auto pc = count_parameters(c.model);
    const auto& m = c.model;
    const std::vector<std::string> row = {short_name(c.name),
                                          human_count(double(pc.total())),
                                          human_count(double(pc.active())),
                                          std::to_string(m.num_layers),
                                          std::to_string(m.d_model),
                                          std::to_string(m.mla.d_latent),
                                          std::to_string(m.moe.num_experts),
                                          std::to_string(m.moe.num_experts_per_token),
                                          gpu_range(c.hardware),
                                          fixed(c.hardware.gpu_memory_gb, 0) + "GB",
                                          context_text(m.context_length)};
    for (size_t i = 0; i < row.size(); ++i) os << pad(row[i], cols[i].second) << ' ';
    os << '\n';
  }
  os << "Total/Active: main model, embedding and head once each, MTP modules excluded (see --info).\n";
  return os.str();
}

std::string info_text(const Config& c) {
  const auto& m = c.model;
  const ParamCounts pc = count_parameters(m);
  const FlopsPerToken f = training_flops_per_token(m, c.training.seq_length);
  const Layout l = config_layout_on(c, c.hardware.gpus_recommended);
  const MemoryEstimate mem = memory_per_gpu(c, l, MemoryOptions::from(c));
  std::ostringstream os;
  os << c.name << "  (" << c.source_path << ")\n" << c.description << "\n\n";
  os << "Architecture\n";
  os << "  layers " << m.num_layers << " (" << m.num_dense_layers << " dense, " << m.num_moe_layers()
     << " MoE), hidden " << m.d_model << ", vocab " << m.vocab_size << ", context " << m.context_length
     << "\n";
  os << "  MLA: " << m.num_heads << " heads, q_lora_rank " << m.mla.q_lora_rank << ", KV latent "
     << m.mla.d_latent << ", head dims nope " << m.mla.qk_nope_head_dim << " + rope "
     << m.mla.qk_rope_head_dim << ", v " << m.mla.v_head_dim << "\n";
  os << "  MoE: " << m.moe.num_experts << " routed experts (top-" << m.moe.num_experts_per_token << ", "
     << m.moe.num_groups << " groups, top-" << m.moe.topk_groups << " groups) + " << m.moe.num_shared_experts
     << " shared, width " << m.moe.expert_dim << ", " << m.moe.score_func << " scores, route scale "
     << m.moe.route_scale << "; dense FFN width " << m.ffn_dim << "\n";
  os << "  RoPE theta " << m.rope.theta << ", "
     << (m.yarn_active()
             ? "YaRN x" + fixed(m.rope.factor, 0) + " from " + std::to_string(m.rope.original_context_length)
             : std::string("no YaRN"))
     << "; MTP depth " << m.mtp.depth << " (lambda " << m.mtp.loss_weight << ")\n\n";

  os << "Parameters            total        active\n";
  for (const auto& [name, v] : pc.rows())
    os << "  " << pad(name, 20) << pad(human_count(double(v.total)), 10, true) << "  "
       << pad(human_count(double(v.active)), 10, true) << "\n";
  os << "  " << pad("main model", 20) << pad(human_count(double(pc.total())), 10, true) << "  "
     << pad(human_count(double(pc.active())), 10, true) << "   (" << pc.total() << " / " << pc.active()
     << ")\n";
  os << "  " << pad("with MTP", 20) << pad(human_count(double(pc.total_with_mtp())), 10, true) << "\n\n";

  os << "Training FLOPs per token at seq " << c.training.seq_length << ": " << human_flops(f.total())
     << " (matmul 6 x active weights " << human_flops(f.matmul) << " + causal attention "
     << human_flops(f.attention) << ")\n\n";

  os << "Memory per GPU, config layout " << layout_text(l) << " on " << l.world() << " GPUs (";
  if (l.world() != c.hardware.gpus_recommended)
    os << "tp x pp x dp; the config recommends " << c.hardware.gpus_recommended << "; ";
  os << "busiest rank: pipeline stage " << mem.stage << ")\n";
  auto line = [&](const char* what, double b) {
    os << "  " << pad(what, 20) << pad(human_bytes(b), 12, true) << "\n";
  };
  line("weights", mem.weights);
  line("gradients", mem.gradients);
  line("optimizer state", mem.optimizer);
  line("activations", mem.activations);
  line("MoE dispatch", mem.moe_dispatch);
  line("logits workspace", mem.logits);
  line("total", mem.total());
  const double usable = usable_bytes(c.hardware.gpu_memory_gb);
  os << "  " << (mem.total() <= usable ? "fits" : "does NOT fit") << " the "
     << fixed(c.hardware.gpu_memory_gb, 0) << " GB GPU (" << human_bytes(usable)
     << " usable: " << int(kUsableMemoryFraction * 100) << "% less " << human_bytes(kReservedBytes)
     << " reserve)\n";
  os << "  assumptions:\n";
  for (const auto& a : mem.assumptions) os << "    - " << a << "\n";
  {
    const HardwareSpec hs = hardware_spec(c.hardware);
    const StepCost sc = step_cost(c, l, recompute_set(c.training), hs);
    os << "Step time of that layout by the cost model (global batch " << c.training.global_batch_size << " x "
       << c.training.seq_length << ", " << sc.microbatches << " micro-batches per DP rank):\n  " << sc.text()
       << "\n  hardware " << hs.gpu << ": " << fixed(hs.peak_tflops, 0) << " TFLOPS bf16 at MFU "
       << fixed(100 * c.hardware.assumed_mfu, 0) << "%, NVLink " << fixed(hs.nvlink_gbps, 0)
       << " GB/s within " << hs.gpus_per_node << " GPUs, InfiniBand " << fixed(hs.ib_gbps, 0) << " GB/s ("
       << hs.source << ")\n";
  }
  os << "\n";

  const auto& h = c.hardware;
  os << "Hardware: " << gpu_range(h) << " x " << h.gpu_type << " (" << fixed(h.gpu_memory_gb, 0)
     << " GB), recommended " << h.gpus_recommended << "\n";
  // The roofline on the layout's GPUs, and on the config's recommended count when that differs.
  auto roofline = [&](int64_t gpus, const char* which) {
    const double tps = gpus * h.peak_tflops * 1e12 * h.assumed_mfu / f.total();
    os << "Estimated throughput on " << gpus << " GPUs" << which << ": " << fixed(tps, 0) << " tokens/s"
       << "  (roofline: " << gpus << " x " << fixed(h.peak_tflops, 0) << " TFLOPS peak x assumed MFU "
       << fixed(h.assumed_mfu * 100, 0) << "% / " << human_flops(f.total()) << " per token)\n";
  };
  if (l.world() != h.gpus_recommended) {
    roofline(l.world(), " (the layout above)");
    roofline(h.gpus_recommended, " (the config's recommendation)");
  } else {
    roofline(h.gpus_recommended, "");
  }
  if (h.quoted_tokens_per_s > 0) {
    const double implied = h.quoted_tokens_per_s * f.total() / (h.quoted_gpus * h.peak_tflops * 1e12);
    os << "Quoted: " << fixed(h.quoted_tokens_per_s, 0) << " tokens/s on " << h.quoted_gpus
       << " GPUs, which is " << fixed(implied * 100, 2) << "% MFU by this FLOP count (the roofline at "
       << fixed(h.assumed_mfu * 100, 0) << "% would be "
       << fixed(h.quoted_gpus * h.peak_tflops * 1e12 * h.assumed_mfu / f.total(), 0) << " tokens/s)\n";
  }
  os << "Features:";
  for (const auto& [name, on] : features(c)) os << "\n  [" << (on ? "x" : " ") << "] " << name;
  os << "\n";
  return os.str();
}

std::string recommendation_text(const Recommendation& r, const HardwareQuery& hw) {
  std::ostringstream os;
  os << "Hardware: " << hw.gpus << " GPU(s) x " << fixed(hw.gpu_memory_gb, 0) << " GB"
     << (hw.use_case.empty() ? "" : ", use case " + hw.use_case)
     << (hw.budget.empty() ? "" : ", budget " + hw.budget) << "\n\n";
  if (!r.recommended) {
    os << "No config fits.\n";
  } else {
    const Plan& p = *r.recommended;
    os << "Recommended: " << p.config_name << "  (" << p.config_path << ")\n";
    os << "  layout   " << layout_text(p.layout) << ", recompute "
       << recompute_set(p.recompute, p.recompute_modules).text() << "\n";
    os << "  memory   " << human_bytes(p.memory.total()) << " per GPU (weights "
       << human_bytes(p.memory.weights) << ", grads " << human_bytes(p.memory.gradients) << ", optimizer "
       << human_bytes(p.memory.optimizer) << ", activations " << human_bytes(p.memory.activations) << ")\n";
    os << "  cost     " << p.cost.text() << "\n";
    os << "  mpirun   mpirun -np " << p.layout.world() << " build/bin/dsv3-train --config " << p.config_path
       << " --set parallel.tp=" << p.layout.tp << " --set parallel.pp=" << p.layout.pp
       << " --set parallel.ep=" << p.layout.ep << " --set parallel.zero_stage=" << p.layout.zero_stage
       << (p.layout.virtual_stages > 1
               ? " --set parallel.virtual_stages=" + std::to_string(p.layout.virtual_stages)
               : std::string())
       << " --set training.recompute=" << p.recompute;
    if (!p.recompute_modules.empty())
      os << " --set training.recompute_modules=" << recompute_modules_arg(p.recompute_modules);
    os << "\n";
  }
  os << "\nWhy:\n";
  for (const auto& s : r.reasons) os << "  - " << s << "\n";
  if (!r.runner_up_layouts.empty()) {
    os << "\nNext-best layouts of " << r.recommended->config_name << ":\n";
    for (const auto& a : r.runner_up_layouts)
      os << "  " << layout_text(a.layout) << ", recompute "
         << recompute_set(a.recompute, a.recompute_modules).text() << ", " << human_bytes(a.memory.total())
         << "/GPU\n    " << a.cost.text() << "\n";
  }
  if (!r.alternatives.empty()) {
    os << "\nRunners-up:\n";
    for (const auto& a : r.alternatives)
      os << "  " << pad(a.config_name, 18) << layout_text(a.layout) << ", recompute " << a.recompute << ", "
         << human_bytes(a.memory.total()) << "/GPU, ~" << fixed(a.tokens_per_s, 0) << " tokens/s\n";
  }
  return os.str();
}

std::string layouts_text(const Config& c, int64_t gpus, double gpu_memory_gb, size_t top) {
  std::ostringstream os;
  const HardwareSpec hs = hardware_spec(c.hardware);
  const std::vector<Plan> all = ranked_layouts(c, gpus, gpu_memory_gb);
  os << c.name << " on " << gpus << " x " << hs.gpu << " " << fixed(gpu_memory_gb, 0) << " GB ("
     << human_bytes(usable_bytes(gpu_memory_gb)) << " usable): " << all.size()
     << " fitting layout/recompute choices, fastest first by the cost model\n";
  auto row = [&](const Plan& p) {
    os << "  " << layout_text(p.layout) << ", recompute "
       << recompute_set(p.recompute, p.recompute_modules).text() << ", " << human_bytes(p.memory.total())
       << "/GPU\n      " << p.cost.text() << "\n";
  };
  for (size_t i = 0; i < all.size() && i < top; ++i) {
    os << pad(std::to_string(i + 1) + ".", 4, true);
    row(all[i]);
  }
  if (auto own = plan_config_layout(c, gpus, gpu_memory_gb)) {
    const bool fits = own->memory.total() <= usable_bytes(gpu_memory_gb);
    os << "\nThe config's layout: " << (fits ? "fits" : "does NOT fit") << ", rank " << rank_among(all, *own)
       << " of " << all.size() << "\n    ";
    row(*own);
  } else {
    os << "\nThe config's layout (tp=" << c.parallel.tp << " pp=" << c.parallel.pp << ") does not divide "
       << gpus << " GPUs or the model\n";
  }
  return os.str();
}

}  // namespace dsv3
