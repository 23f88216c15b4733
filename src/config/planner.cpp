// Layout search and config recommendation; see planner.hpp.
#include "config/planner.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"
#include "core/format.hpp"

namespace dsv3 {

double usable_bytes(double gpu_memory_gb) {
  return gpu_memory_gb * double(1ull << 30) * kUsableMemoryFraction - kReservedBytes;
}

namespace {

// A copy of the config whose global batch is a multiple of micro_batch * dp (rounded up).
Config with_batch_for(const Config& c, int64_t dp) {
  Config out = c;
  const int64_t unit = c.training.micro_batch_size * dp;
  out.training.global_batch_size = (c.training.global_batch_size + unit - 1) / unit * unit;
  return out;
}

bool layout_ok(const Config& c, const Layout& l) {
  try {
    check_layout(c, l);
    return true;
  } catch (const Error&) {
    return false;
  }
}

std::vector<int64_t> divisors(int64_t n, int64_t cap) {
  std::vector<int64_t> out;
  for (int64_t i = 1; i <= std::min(n, cap); ++i)
    if (n % i == 0) out.push_back(i);
  return out;
}

// The recompute choices the search tries: none, the elementwise rebuilds only, DeepSeek-V3's set
// (the default of selective), full.
const std::vector<std::pair<std::string, std::vector<std::string>>>& recompute_choices() {
  static const std::vector<std::pair<std::string, std::vector<std::string>>> choices = {
      {"none", {}}, {"selective", {"norms", "swiglu"}}, {"selective", {}}, {"full", {}}};
  return choices;
}

}  // namespace

Plan plan_for(const Config& c, const Layout& l, const std::string& recompute,
              const std::vector<std::string>& modules, int64_t gpus) {
  MemoryOptions o = MemoryOptions::from(c);
  o.recompute = recompute;
  o.recompute_modules = modules;
  Plan p;
  p.config_path = c.source_path;
  p.config_name = c.name;
  p.layout = l;
  p.recompute = recompute;
  p.recompute_modules = modules;
  p.memory = memory_per_gpu(c, l, o);
  Config cr = c;
  cr.training.recompute = recompute, cr.training.recompute_modules = modules;
  DSV3_CHECK(gpus == l.world(), "plan: layout of ", l.world(), " GPUs for ", gpus);
  p.cost = step_cost(cr, l, o.recompute_set(), hardware_spec(c.hardware));
  p.relative_cost = p.cost.step_s / std::max(1e-30, p.cost.compute_s);
  p.tokens_per_s = p.cost.tokens_per_s;
  const auto& cp = c.parallel;
  p.is_config_layout = l.tp == cp.tp && l.pp == cp.pp && l.ep == cp.ep && l.zero_stage == cp.zero_stage &&
                       l.virtual_stages == cp.virtual_stages && recompute == c.training.recompute &&
                       modules == c.training.recompute_modules;
  return p;
}

std::optional<Plan> plan_config_layout(const Config& c, int64_t gpus, double gpu_memory_gb) {
  const auto& p = c.parallel;
  if (gpus % (p.tp * p.pp) != 0) return std::nullopt;
  Layout l;
  l.tp = p.tp, l.pp = p.pp, l.ep = p.ep, l.expert_tp = p.expert_tp, l.zero_stage = p.zero_stage;
  l.sequence_parallel = p.sequence_parallel;
  l.virtual_stages = p.virtual_stages, l.last_stage_layers = p.last_stage_layers;
  l.dp = gpus / (p.tp * p.pp);
  const Config cb = with_batch_for(c, l.dp);
  if (!layout_ok(cb, l)) return std::nullopt;
  return plan_for(cb, l, c.training.recompute, c.training.recompute_modules, gpus);
}

std::vector<Plan> ranked_layouts(const Config& c, int64_t gpus, double gpu_memory_gb, size_t limit) {
  const double budget = usable_bytes(gpu_memory_gb);
  std::vector<Plan> fits;
  const int64_t experts = std::max<int64_t>(1, c.model.moe.num_experts);
  const int64_t node = hardware_spec(c.hardware).gpus_per_node;
  for (int64_t tp : {1, 2, 4, 8}) {  // TP stays inside a node
    if (gpus % tp || tp > node) continue;
    for (int64_t pp : divisors(gpus / tp, std::min<int64_t>(c.model.num_layers, 64))) {
      const int64_t dp = gpus / (tp * pp);
      const Config cb = with_batch_for(c, dp);
      for (int64_t vp : {1, 2, 4}) {
        if (vp > 1 && (pp == 1 || c.model.num_layers < pp * vp)) continue;
        for (int64_t ep : divisors(experts, experts)) {
          if ((dp * tp) % ep) continue;
          for (int64_t zero : {0, 1, 2}) {
            if (zero > 0 && dp == 1) continue;  // nothing to shard
            Layout l;
            l.tp = tp, l.pp = pp, l.ep = ep, l.dp = dp, l.zero_stage = zero, l.virtual_stages = vp;
            l.expert_tp = c.parallel.expert_tp;
            l.sequence_parallel = c.parallel.sequence_parallel;
            if (!layout_ok(cb, l)) continue;
            for (const auto& [rc, mods] : recompute_choices()) {
              Plan p = plan_for(cb, l, rc, mods, gpus);
              if (p.memory.total() <= budget) fits.push_back(std::move(p));
            }
          }
        }
      }
    }
  }
  std::stable_sort(fits.begin(), fits.end(), [](const Plan& a, const Plan& b) {
    if (std::fabs(a.cost.step_s - b.cost.step_s) > 1e-9 * b.cost.step_s) return a.cost.step_s < b.cost.step_s;
    return a.memory.total() < b.memory.total();
  });
  if (limit > 0 && fits.size() > limit) fits.resize(limit);
  return fits;
}

int64_t rank_among(const std::vector<Plan>& ranked, const Plan& p) {
  int64_t faster = 0;
  for (const Plan& q : ranked)
    if (q.cost.step_s < p.cost.step_s * (1 - 1e-9)) ++faster;
  return faster + 1;
}

std::optional<Plan> best_layout(const Config& c, int64_t gpus, double gpu_memory_gb) {
  std::vector<Plan> r = ranked_layouts(c, gpus, gpu_memory_gb, 1);
  if (r.empty()) return std::nullopt;
  return r.front();
}

int64_t min_gpus_to_fit(const Config& c, double gpu_memory_gb, int64_t limit) {
  std::vector<int64_t> counts = {1, 2, 4};
  for (int64_t n = 8; n <= limit; n += n < 64 ? 8 : n < 512 ? 64 : n < 4096 ? 512 : 4096) counts.push_back(n);
  for (int64_t n : counts)
    if (n <= limit && best_layout(c, n, gpu_memory_gb)) return n;
  return 0;
}

Recommendation recommend(const std::vector<Config>& configs, const HardwareQuery& hw) {
  DSV3_CHECK(hw.gpus >= 1, "--gpus must be at least 1, got ", hw.gpus);
  DSV3_CHECK(hw.gpu_memory_gb > 0, "--gpu-memory must be positive (GB), got ", hw.gpu_memory_gb);
  auto cap_index = [](const std::string& v, std::initializer_list<const char*> names,
                      std::initializer_list<const char*> caps, const char* what) -> std::string {
    if (v.empty()) return "";
    auto n = names.begin();
    auto c = caps.begin();
    std::string list;
    for (; n != names.end(); ++n, ++c) {
      if (v == *n) return *c;
      list += std::string(list.empty() ? "" : ", ") + *n;
    }
    raise("unknown ", what, " '", v, "' (choose one of: ", list, ")");
  };
  const std::string use_cap = cap_index(hw.use_case, {"learning", "research", "production"},
                                        {"deepseek_v3_1b", "deepseek_v3_10b", ""}, "use case");
  const std::string budget_cap =
      cap_index(hw.budget, {"low", "medium", "high", "very-high", "extreme"},
                {"deepseek_v3_1b", "deepseek_v3_5b", "deepseek_v3_10b", "deepseek_v3_20b", ""}, "budget");

  Recommendation r;
  // Candidates: every config but the CI one, smallest first, cut at the use-case/budget caps.
  std::vector<const Config*> cands;
  for (const auto& c : configs) {
    if (c.name == "deepseek_v3_tiny") continue;
    cands.push_back(&c);
  }
  std::sort(cands.begin(), cands.end(), [](const Config* a, const Config* b) {
    return count_parameters(a->model).total() < count_parameters(b->model).total();
  });
  auto cut = [&](const std::string& cap, const std::string& why) {
    if (cap.empty()) return;
    auto it = std::find_if(cands.begin(), cands.end(), [&](const Config* c) { return c->name == cap; });
    if (it != cands.end() && it + 1 != cands.end()) {
      cands.erase(it + 1, cands.end());
      r.reasons.push_back(why + " caps the choice at " + cap);
    }
  };
  cut(use_cap, "use case '" + hw.use_case + "'");
  cut(budget_cap, "budget '" + hw.budget + "'");

  // The seed's bucket: the largest config whose GPU range holds this count and whose memory class
  // this GPU meets.
  const Config* seed = nullptr;
  for (const Config* c : cands) {
    const auto& h = c->hardware;
    if (hw.gpus >= h.gpus_min && (h.gpus_max == 0 || hw.gpus <= h.gpus_max) &&
        hw.gpu_memory_gb >= h.gpu_memory_gb)
      seed = c;
  }
  if (seed) r.seed_choice = seed->name;

  std::vector<Plan> fitting;
  for (const Config* c : cands)
    if (auto p = best_layout(*c, hw.gpus, hw.gpu_memory_gb)) fitting.push_back(*p);

  const std::string hw_text = std::to_string(hw.gpus) + " GPU" + (hw.gpus > 1 ? "s" : "") + " x " +
                              fixed(hw.gpu_memory_gb, 0) + " GB";
  if (fitting.empty()) {
    r.reasons.push_back("no config fits " + hw_text +
                        " by the memory model, even with ZeRO-2 and full recompute");
    if (!cands.empty()) {
      const int64_t need = min_gpus_to_fit(*cands.front(), hw.gpu_memory_gb);
      if (need > 0)
        r.reasons.push_back("the smallest, " + cands.front()->name + ", needs at least " +
                            std::to_string(need) + " GPUs of " + fixed(hw.gpu_memory_gb, 0) + " GB");
    }
    return r;
  }
  auto find_fit = [&](const std::string& name) -> const Plan* {
    for (const auto& p : fitting)
      if (p.config_name == name) return &p;
    return nullptr;
  };

  const Plan* chosen = nullptr;
  if (seed) {
    chosen = find_fit(seed->name);
    if (chosen) {
      r.reasons.push_back(
          "the seed's hardware table puts " + hw_text + " in the " + seed->name + " bucket (" +
          std::to_string(seed->hardware.gpus_min) + "-" +
          (seed->hardware.gpus_max ? std::to_string(seed->hardware.gpus_max) : std::string("any")) +
          " GPUs, " + fixed(seed->hardware.gpu_memory_gb, 0) + " GB+), and the memory model agrees");
    } else {
      const int64_t need = min_gpus_to_fit(*seed, hw.gpu_memory_gb);
      r.reasons.push_back("the seed's hardware table suggests " + seed->name + " for " + hw_text +
                          ", but the memory model disagrees: it does not fit on any layout" +
                          (need ? " (it needs at least " + std::to_string(need) + " GPUs of " +
                                      fixed(hw.gpu_memory_gb, 0) + " GB)"
                                : std::string(" of up to 65536 GPUs")));
    }
  } else {
    r.reasons.push_back("no seed bucket matches " + hw_text + "; choosing by the memory model alone");
  }
  if (!chosen) {
    chosen = &fitting.back();  // the largest that fits
    r.reasons.push_back(chosen->config_name + " is the largest config that fits " + hw_text);
  }
  const Plan& p = *chosen;
  r.reasons.push_back("layout tp=" + std::to_string(p.layout.tp) + " pp=" + std::to_string(p.layout.pp) +
                      " ep=" + std::to_string(p.layout.ep) + " dp=" + std::to_string(p.layout.dp) + " ZeRO-" +
                      std::to_string(p.layout.zero_stage) +
                      " recompute=" + recompute_set(p.recompute, p.recompute_modules).text() + " needs " +
                      human_bytes(p.memory.total()) + " of " + human_bytes(usable_bytes(hw.gpu_memory_gb)) +
                      " usable per GPU and is the fastest fitting layout by the cost model (" +
                      p.cost.text() + ")");
  r.recommended = p;
  for (const Config* c : cands)
    if (c->name == p.config_name) {
      std::vector<Plan> ranked = ranked_layouts(*c, hw.gpus, hw.gpu_memory_gb, 4);
      for (size_t i = 1; i < ranked.size(); ++i) r.runner_up_layouts.push_back(ranked[i]);
    }
  for (auto it = fitting.rbegin(); it != fitting.rend(); ++it)
    if (it->config_name != p.config_name) r.alternatives.push_back(*it);
  return r;
}

}  // namespace dsv3
