// Config selector and layout planner: which config fits given hardware, on which TP/PP/EP/DP/ZeRO
// layout and recompute setting, and why. Decisions come from the accounting module's memory model;
// the seed's GPU buckets (hardware.gpus_min/max in each config) are honoured where physics allows.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "config/accounting.hpp"
#include "config/config.hpp"

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
  std::string recompute;
  MemoryEstimate memory;
  double relative_cost = 1.0;     // >= 1: modelled slowdown from bubbles, recompute, TP/EP communication
  double tokens_per_s = 0;        // roofline: gpus * peak * mfu / flops_per_token
  bool is_config_layout = false;  // the layout the config file itself asks for
};

// The cheapest layout (by relative_cost) that fits `gpus` GPUs of `gpu_memory_gb`; nullopt if none.
std::optional<Plan> best_layout(const Config& c, int64_t gpus, double gpu_memory_gb);
// Smallest GPU count (of 1, 2, 4, 8 and multiples of 8) on which some layout fits; 0 if none <= limit.
int64_t min_gpus_to_fit(const Config& c, double gpu_memory_gb, int64_t limit = 65536);
// Plan for the config's own layout (its parallel section) on `gpus` GPUs, fitting or not.
std::optional<Plan> plan_config_layout(const Config& c, int64_t gpus, double gpu_memory_gb);

struct Recommendation {
  std::optional<Plan> recommended;
  std::vector<Plan> alternatives;
  std::vector<std::string> reasons;  // why, in order; includes where the memory model and the seed disagree
  std::string seed_choice;           // the config the seed's GPU buckets point to ("" if none)
};

// `configs` in increasing size (list order of configs/); the tiny CI config is never recommended.
Recommendation recommend(const std::vector<Config>& configs, const HardwareQuery& hw);

}  // namespace dsv3
