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

}  // namespace dsv3
