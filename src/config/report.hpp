// Text and JSON renderings of the accounting and planner results, shared by dsv3-config, the trainer
// banner and the tests (JSON keys are a stable interface for scripts).
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "config/accounting.hpp"
#include "config/planner.hpp"

namespace dsv3 {

// The config's own layout on its recommended GPU count (dp derived).
Layout config_layout_on(const Config& c, int64_t gpus);

nlohmann::json layout_json(const Layout& l);
nlohmann::json memory_json(const MemoryEstimate& m);
nlohmann::json info_json(const Config& c);  // name, total_params, active_params, ...
nlohmann::json plan_json(const Plan& p);
nlohmann::json recommendation_json(const Recommendation& r);

std::string list_table(const std::vector<Config>& configs);
std::string info_text(const Config& c);
std::string recommendation_text(const Recommendation& r, const HardwareQuery& hw);

// "tp=2 pp=16 vp=2 ep=64 dp=32 zero=1" (vp only when > 1).
std::string layout_text(const Layout& l);

// The `top` fastest fitting layouts of c on `gpus` GPUs of `gpu_memory_gb` with their memory and
// cost breakdown, then the config's own layout (its parallel section on those GPUs) with its rank.
std::string layouts_text(const Config& c, int64_t gpus, double gpu_memory_gb, size_t top);

}  // namespace dsv3
