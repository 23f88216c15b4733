// The op registry on the CUDA backend: every registered case with its inputs, outputs and gradients
// on the GPU, against the same double reference and finite differences as the host run
// (test_ops.cpp). Built only with -DDSV3_ENABLE_CUDA=ON (ctest label gpu); on a machine without a
// visible GPU every case reports itself as skipped, never as passed.
#include <gtest/gtest.h>

#include <algorithm>

#include "backend_info.hpp"
#include "cuda/cuda_ops.hpp"
#include "registry.hpp"

namespace {

bool have_gpu() {
  static const bool yes = !dsv3::cuda_devices().empty();
  return yes;
}

class OpRegistryGpu : public ::testing::TestWithParam<dsv3::optest::OpCase> {};

TEST_P(OpRegistryGpu, Cuda) {
  if (!have_gpu()) GTEST_SKIP() << "no GPU visible: not run";
  const auto r = dsv3::optest::run_case(GetParam(), dsv3::Device::Cuda);
  EXPECT_TRUE(r.ok) << r.message;
  dsv3::cuda::synchronize();  // a failed kernel shows here, not in the next case
}

std::string case_name(const ::testing::TestParamInfo<dsv3::optest::OpCase>& info) {
  std::string s = info.param.full_name();
  std::replace_if(
      s.begin(), s.end(), [](char ch) { return !std::isalnum(static_cast<unsigned char>(ch)); }, '_');
  return s;
}

INSTANTIATE_TEST_SUITE_P(Ops, OpRegistryGpu, ::testing::ValuesIn(dsv3::optest::all_op_cases()), case_name);

// Device memory: a step's shapes, allocated twice, take no new cudaMalloc the second time.
TEST(CudaMemory, SecondPassOfTheSameShapesAllocatesNothing) {
  if (!have_gpu()) GTEST_SKIP() << "no GPU visible: not run";
  auto pass = [] {
    std::vector<dsv3::OwnedTensor> held;
    for (int64_t n : {7, 1000, 300000, 5000000, 1000})
      held.emplace_back(dsv3::DType::F32, std::vector<int64_t>{n}, "t", dsv3::Device::Cuda);
  };
  pass();
  const int64_t before = dsv3::cuda::memory_stats().device_allocs;
  pass();
  EXPECT_EQ(dsv3::cuda::memory_stats().device_allocs, before);
}

}  // namespace
