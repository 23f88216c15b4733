// Planner: recommendations for the seed's hardware buckets, the cases where physics and the seed
// disagree, and the caps from use case and budget.
#include <gtest/gtest.h>

#include "config/config.hpp"
#include "config/planner.hpp"
#include "config/report.hpp"
#include "core/error.hpp"

using namespace dsv3;

namespace {
const std::vector<Config>& all_configs() {
  static const std::vector<Config> configs = [] {
    std::vector<Config> v;
    for (const auto& p : list_config_paths()) v.push_back(load_config(p));
    return v;
  }();
  return configs;
}
Recommendation ask(int64_t gpus, double mem, std::string use_case = "", std::string budget = "") {
  return recommend(all_configs(), HardwareQuery{gpus, mem, use_case, budget});
}
bool mentions(const std::vector<std::string>& reasons, const std::string& s) {
  for (const auto& r : reasons)
    if (r.find(s) != std::string::npos) return true;
  return false;
}
}  // namespace

TEST(Planner, SeedBuckets) {
  struct Case {
    int64_t gpus;
    double mem;
    const char* expected;
  };
  for (const Case c :
       {Case{1, 24, "deepseek_v3_1b"}, Case{2, 24, "deepseek_v3_1b"}, Case{4, 40, "deepseek_v3_5b"},
        Case{8, 40, "deepseek_v3_5b"}, Case{8, 80, "deepseek_v3_10b"}, Case{16, 80, "deepseek_v3_15b"},
        Case{24, 80, "deepseek_v3_20b"}}) {
    SCOPED_TRACE(std::to_string(c.gpus) + " x " + std::to_string(int(c.mem)) + " GB");
    const Recommendation r = ask(c.gpus, c.mem);
    ASSERT_TRUE(r.recommended.has_value());
    EXPECT_EQ(r.recommended->config_name, c.expected);
    EXPECT_EQ(r.seed_choice, c.expected);
    EXPECT_TRUE(mentions(r.reasons, "memory model agrees"));
    const Plan& p = *r.recommended;
    EXPECT_LE(p.memory.total(), usable_bytes(c.mem));
    EXPECT_EQ(p.layout.world(), c.gpus);
    const Config cfg = load_config(p.config_path);
    Layout l = p.layout;
    EXPECT_NO_THROW(check_layout(cfg, Layout{l.tp, l.pp, l.ep, 0, l.expert_tp, l.zero_stage, false}));
  }
}

TEST(Planner, PhysicsOverrulesTheSeedFor671BOn32GPUs) {
  const Recommendation r = ask(32, 80);
  EXPECT_EQ(r.seed_choice, "deepseek_v3_base");
  ASSERT_TRUE(r.recommended.has_value());
  EXPECT_NE(r.recommended->config_name, "deepseek_v3_base");
  EXPECT_TRUE(mentions(r.reasons, "memory model disagrees"));
  const Config base = load_config(resolve_config_path("671b"));
  const int64_t need = min_gpus_to_fit(base, 80);
  EXPECT_GT(need, 32);
  EXPECT_TRUE(best_layout(base, need, 80).has_value());
  EXPECT_FALSE(best_layout(base, 32, 80).has_value());
  // With enough GPUs the seed's choice stands.
  const Recommendation big = ask(need, 80);
  ASSERT_TRUE(big.recommended.has_value());
  EXPECT_EQ(big.recommended->config_name, "deepseek_v3_base");
}

TEST(Planner, UseCaseAndBudgetCap) {
  EXPECT_EQ(ask(8, 80, "learning").recommended->config_name, "deepseek_v3_1b");
  EXPECT_EQ(ask(8, 80, "", "medium").recommended->config_name, "deepseek_v3_5b");
  EXPECT_EQ(ask(24, 80, "research").recommended->config_name, "deepseek_v3_10b");
  EXPECT_THROW(ask(8, 80, "gaming"), Error);
  EXPECT_THROW(ask(8, 80, "", "huge"), Error);
  EXPECT_THROW(ask(0, 80), Error);
}

TEST(Planner, NothingFitsIsExplained) {
  const Recommendation r = ask(1, 8);
  EXPECT_FALSE(r.recommended.has_value());
  EXPECT_TRUE(mentions(r.reasons, "no config fits"));
  EXPECT_TRUE(mentions(r.reasons, "needs at least"));
}

TEST(Planner, MoreMemoryNeverHurts) {
  const Config c = load_config(resolve_config_path("10b"));
  for (int64_t gpus : {8, 16}) {
    const auto a = best_layout(c, gpus, 80);
    const auto b = best_layout(c, gpus, 141);
    ASSERT_TRUE(a && b);
    EXPECT_LE(b->relative_cost, a->relative_cost);
  }
}

TEST(Planner, RecommendationJsonKeys) {
  const nlohmann::json j = recommendation_json(ask(8, 80));
  EXPECT_EQ(j["recommended"]["config"], "deepseek_v3_10b");
  for (const char* k : {"tp", "pp", "ep", "dp", "zero_stage"})
    EXPECT_TRUE(j["recommended"]["layout"].contains(k)) << k;
  EXPECT_GT(j["recommended"]["memory_per_gpu_bytes"].get<double>(), 0);
  EXPECT_TRUE(j["alternatives"].is_array());
  const nlohmann::json info = info_json(load_config(resolve_config_path("671b")));
  EXPECT_EQ(info["total_params"].get<int64_t>(), 671026404352LL);
  for (const char* k :
       {"name", "total_params", "active_params", "flops_per_token", "memory_per_gpu_bytes", "layout"})
    EXPECT_TRUE(info.contains(k)) << k;
}

// An explicit layout is reported on its own GPU count (tp x pp x dp), not the config's recommendation.
TEST(Planner, InfoNamesTheGpusOfAnExplicitLayout) {
  const Config c =
      load_config(resolve_config_path("671b"), {"parallel.tp=1", "parallel.pp=16", "parallel.ep=64",
                                                "parallel.dp=128", "training.global_batch_size=15360"});
  ASSERT_NE(c.hardware.gpus_recommended, 2048);
  const std::string text = info_text(c);
  EXPECT_NE(text.find("tp=1 pp=16 ep=64 dp=128 zero=1 on 2048 GPUs (tp x pp x dp; the config recommends " +
                      std::to_string(c.hardware.gpus_recommended) + "; busiest rank"),
            std::string::npos)
      << text.substr(0, 2000);
  EXPECT_EQ(info_json(c)["layout_gpus"].get<int64_t>(), 2048);
}
