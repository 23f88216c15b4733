// Config selector and layout planner: which config fits given hardware, on which TP/PP/EP/DP/ZeRO
// layout and recompute setting, and why. Decisions come from the accounting module's memory model;
// the seed's GPU buckets (hardware.gpus_min/max in each config) are honoured where physics allows.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "config/accounting.hpp"
#include "config/config.hpp"
#include "config/cost.hpp"

namespace dsv3 {

struct HardwareQuery {
  int64_t gpus = 1;
  double gpu_memory_gb = 80;
  std::string use_case;  // "" | research | production | learning
  std::string budget;    // "" | low | medium | high | very-high | extreme
};

// Fraction of GPU memory the planner lets the estimate use, and a fixed reserve for the CUDA
// context, NCCL buffers and fragmentation that the estimate does not model.
constexpr double kUsableMemoryFraction = 0.90;
constexpr double kReservedBytes = 2.0 * (1ull << 30);
double usable_bytes(double gpu_memory_gb);

struct Plan {
  std::string config_path;
  std::string config_name;
  Layout layout;
  std::string recompute;                       // policy
  std::vector<std::string> recompute_modules;  // selective: its modules (empty: the default set)
  MemoryEstimate memory;
  StepCost cost;                  // the cost model's step time and its parts (config/cost.hpp)
  double relative_cost = 1.0;     // step time over the compute-only time (>= 1)
  double tokens_per_s = 0;        // by the cost model
  bool is_config_layout = false;  // the layout the config file itself asks for
};

// The layouts that fit `gpus` GPUs of `gpu_memory_gb`, fastest first by the cost model (ties: less
// memory), searching TP (within a node), PP, virtual stages, EP, ZeRO 0-2 and the recompute
// policies none, selective [norms, swiglu], selective (default) and full. At most `limit` plans.
std::vector<Plan> ranked_layouts(const Config& c, int64_t gpus, double gpu_memory_gb, size_t limit = 0);
// 1 + the number of plans in `ranked` strictly faster than p (p's place among them).
int64_t rank_among(const std::vector<Plan>& ranked, const Plan& p);
// The first of ranked_layouts; nullopt if none fits.
std::optional<Plan> best_layout(const Config& c, int64_t gpus, double gpu_memory_gb);
// The plan of one explicit layout and recompute choice (fitting or not).
Plan plan_for(const Config& c, const Layout& l, const std::string& recompute,
              const std::vector<std::string>& modules, int64_t gpus);
// Smallest GPU count (of 1, 2, 4, 8 and multiples of 8) on which some layout fits; 0 if none <= limit.
int64_t min_gpus_to_fit(const Config& c, double gpu_memory_gb, int64_t limit = 65536);
// Plan for the config's own layout (its parallel section) on `gpus` GPUs, fitting or not.
std::optional<Plan> plan_config_layout(const Config& c, int64_t gpus, double gpu_memory_gb);

struct Recommendation {
  std::optional<Plan> recommended;
  std::vector<Plan> alternatives;       // the best layout of each other config that fits
  std::vector<Plan> runner_up_layouts;  // the recommended config's next-best layouts
  std::vector<std::string> reasons;  // why, in order; includes where the memory model and the seed disagree
  std::string seed_choice;           // the config the seed's GPU buckets point to ("" if none)
};

// `configs` in increasing size (list order of configs/); the tiny CI config is never recommended.
Recommendation recommend(const std::vector<Config>& configs, const HardwareQuery& hw);

}  // namespace dsv3
