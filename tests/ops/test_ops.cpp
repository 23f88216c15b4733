// Runs every registered op case on every backend of this build (host now; CUDA when enabled).
#include <gtest/gtest.h>

#include <algorithm>

#include "registry.hpp"

namespace {

class OpRegistry : public ::testing::TestWithParam<dsv3::optest::OpCase> {};

TEST_P(OpRegistry, Host) {
  const auto r = dsv3::optest::run_case(GetParam(), dsv3::Device::Host);
  EXPECT_TRUE(r.ok) << r.message;
}

std::string case_name(const ::testing::TestParamInfo<dsv3::optest::OpCase>& info) {
  std::string s = info.param.full_name();
  std::replace_if(
      s.begin(), s.end(), [](char ch) { return !std::isalnum(static_cast<unsigned char>(ch)); }, '_');
  return s;
}

INSTANTIATE_TEST_SUITE_P(Ops, OpRegistry, ::testing::ValuesIn(dsv3::optest::all_op_cases()), case_name);

// The registry must hold a case for every op of kernels/ops.hpp.
TEST(OpRegistryCoverage, EveryOpHasACase) {
  const char* ops[] = {"linear",
                       "add_inplace",
                       "scale",
                       "copy_columns",
                       "embedding",
                       "embedding_shard",
                       "rmsnorm",
                       "rope",
                       "attention",
                       "mla_assemble_kv",
                       "swiglu",
                       "scale_rows",
                       "router",
                       "dispatch",
                       "combine",
                       "cross_entropy",
                       "cross_entropy_shard",
                       "seq_balance_loss"};
  const auto cases = dsv3::optest::all_op_cases();
  for (const char* op : ops) {
    const bool found = std::any_of(cases.begin(), cases.end(), [&](const auto& c) { return c.op == op; });
    EXPECT_TRUE(found) << "no registry case for op '" << op << "'";
  }
}

}  // namespace
