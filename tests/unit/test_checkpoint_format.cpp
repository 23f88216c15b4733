// The HDF5-free parts of the checkpoint format: CRC-32C, the pieces of a tensor a shard covers, the
// checksum table and the validation of what a file says about itself.
#include <gtest/gtest.h>

#include <random>
#include <set>

#include "core/crc32c.hpp"
#include "core/error.hpp"
#include "io/checkpoint_format.hpp"
#include "test_util.hpp"

using namespace dsv3;
using dsv3::test_util::error_of;
using dsv3::test_util::tiny;

TEST(Crc32c, KnownVectorsAndBothImplementations) {
  // RFC 3720 B.4 and the common check value.
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  const std::vector<unsigned char> zeros(32, 0), ones(32, 0xFF);
  EXPECT_EQ(crc32c(zeros.data(), 32), 0x8A9136AAu);
  EXPECT_EQ(crc32c(ones.data(), 32), 0x62A8AB43u);
  EXPECT_EQ(crc32c_hex(0xE3069283u), "e3069283");
  std::mt19937 rng(7);
  for (size_t n : {0u, 1u, 7u, 8u, 9u, 63u, 4096u, 100001u}) {
    std::vector<unsigned char> v(n);
    for (auto& b : v) b = static_cast<unsigned char>(rng());
    EXPECT_EQ(crc32c(v.data(), n), crc32c_portable(v.data(), n)) << n;
    // Continuing over a split gives the whole.
    const size_t k = n / 3;
    EXPECT_EQ(crc32c(v.data() + k, n - k, crc32c(v.data(), k)), crc32c(v.data(), n)) << n;
  }
  // One flipped bit changes it.
  std::vector<float> x(1000, 1.5f);
  const uint32_t a = crc32c(x.data(), x.size() * 4);
  reinterpret_cast<unsigned char*>(x.data())[1234] ^= 0x10;
  EXPECT_NE(crc32c(x.data(), x.size() * 4), a);
}

namespace {
// Every element index of the global row-major tensor that elements [a, b) of the block cover, by brute force.
std::vector<int64_t> brute(const std::vector<int64_t>& gshape, const std::vector<int64_t>& ofs,
                           const std::vector<int64_t>& block, int64_t a, int64_t b) {
  std::vector<int64_t> out;
  const size_t nd = block.size();
  for (int64_t e = a; e < b; ++e) {
    int64_t rem = e, flat = 0, stride = 1;
    std::vector<int64_t> idx(nd);
    for (size_t d = nd; d-- > 0;) idx[d] = rem % block[d], rem /= block[d];
    for (size_t d = nd; d-- > 0;) flat += (ofs[d] + idx[d]) * stride, stride *= gshape[d];
    out.push_back(flat);
  }
  return out;
}
}  // namespace

TEST(CheckpointFormat, RunsMatchABruteForceWalk) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 300; ++trial) {
    const size_t nd = 1 + rng() % 3;
    std::vector<int64_t> g(nd), o(nd), b(nd);
    for (size_t d = 0; d < nd; ++d) {
      g[d] = 1 + rng() % 7;
      b[d] = 1 + rng() % g[d];
      o[d] = rng() % (g[d] - b[d] + 1);
    }
    int64_t n = 1;
    for (int64_t x : b) n *= x;
    const int64_t lo = rng() % n, hi = lo + 1 + rng() % (n - lo);
    std::vector<int64_t> got;
    for (const auto& [first, cnt] : element_runs(g, range_boxes(o, b, lo, hi)))
      for (int64_t i = 0; i < cnt; ++i) got.push_back(first + i);
    ASSERT_EQ(got, brute(g, o, b, lo, hi)) << "trial " << trial;
  }
  // A scalar is one run of one element; an empty range no run.
  EXPECT_EQ(element_runs({}, range_boxes({}, {}, 0, 1)), (std::vector<std::pair<int64_t, int64_t>>{{0, 1}}));
  EXPECT_TRUE(element_runs({4}, range_boxes({0}, {4}, 2, 2)).empty());
  // A column split of a [4, 6] matrix: one run per row.
  EXPECT_EQ(element_runs({4, 6}, range_boxes({0, 3}, {4, 3}, 0, 12)).size(), 4u);
}

TEST(CheckpointFormat, ChecksumTableRoundTripAndSlots) {
  std::vector<ChecksumEntry> t(3);
  t[0] = {"/model/a", {0, 0}, {4, 6}, 0, 24, true, 0xdeadbeef};
  t[1] = {"/model/s", {}, {}, 0, 1, true, 0x1};
  t[2] = {"/optimizer/exp_avg/a", {2, 0}, {2, 6}, 3, 12, false, 0};
  std::vector<size_t> at;
  const std::string text = format_checksum_table(t, &at);
  EXPECT_EQ(text.substr(at[0], 8), "deadbeef");
  EXPECT_EQ(text.substr(at[1], 8), "00000001");
  EXPECT_EQ(text.substr(at[2], 8), "--------");
  const auto back = parse_checksum_table(text, "f.h5");
  ASSERT_EQ(back.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(back[i].same_piece(t[i])) << i;
    EXPECT_EQ(back[i].has_crc, t[i].has_crc);
    EXPECT_EQ(back[i].crc, t[i].crc);
  }
  for (const char* bad :
       {"deadbeef 0 4 0 4 /model/a", "deadbeeg 0 4 0 4 /model/a\n", "deadbeef 4 4 0 4 /model/a\n",
        "deadbeef 0 4 0 4,4 /model/a\n", "deadbeef 0 4 0,x 4,4 /model/a\n", "deadbeef 0 4 0\n"}) {
    const std::string e = error_of([&] { parse_checksum_table(bad, "f.h5"); });
    EXPECT_NE(e.find("f.h5: /checksums line 1"), std::string::npos) << bad << " -> " << e;
  }
}

namespace {
CheckpointMeta good_meta() {
  CheckpointMeta m;
  m.where = "f.h5";
  m.schema_version = kCheckpointSchemaVersion;
  m.step = 10, m.consumed_tokens = 100;
  m.layout = "tp=1 pp=1 ep=1 dp=2 expert_tp=1 zero_stage=1 world=2";
  m.config_yaml = tiny().yaml_text;
  m.has_optimizer = true;
  m.datasets = {{"/model/w", {4, 6}}, {"/optimizer/exp_avg/w", {4, 6}}, {"/optimizer/exp_avg_sq/w", {4, 6}}};
  std::vector<ChecksumEntry> t = {{"/model/w", {0, 0}, {4, 6}, 0, 24, true, 1},
                                  {"/optimizer/exp_avg/w", {0, 0}, {4, 6}, 0, 10, true, 2},
                                  {"/optimizer/exp_avg/w", {0, 0}, {4, 6}, 10, 24, true, 3},
                                  {"/optimizer/exp_avg_sq/w", {0, 0}, {2, 6}, 0, 12, true, 4},
                                  {"/optimizer/exp_avg_sq/w", {2, 0}, {2, 6}, 0, 12, true, 5}};
  m.has_checksums = true;
  m.checksums = format_checksum_table(t);
  return m;
}
}  // namespace

TEST(CheckpointFormat, MetadataChecksNameTheCulprit) {
  EXPECT_EQ(check_checkpoint_meta(good_meta()).size(), 5u);
  auto expect = [](const std::function<void(CheckpointMeta&)>& edit, const std::string& want) {
    CheckpointMeta m = good_meta();
    edit(m);
    const std::string e = error_of([&] { check_checkpoint_meta(m); });
    EXPECT_NE(e.find(want), std::string::npos) << "want '" << want << "', got: " << e;
    EXPECT_EQ(e.rfind("f.h5", 0), 0u) << e;
  };
  expect([](auto& m) { m.schema_version = 9; }, "schema_version' is 9");
  expect([](auto& m) { m.step = -1; }, "'step' is -1");
  expect([](auto& m) { m.layout = "tp=2 pp=1 ep=1 dp=2 expert_tp=1 zero_stage=1 world=2"; },
         "world is not tp*pp*dp");
  expect([](auto& m) { m.layout = "tp=1"; }, "lacks pp");
  expect([](auto& m) { m.config_yaml = "model: [1, 2"; }, "stored config");
  expect([](auto& m) { m.datasets["/elsewhere/x"] = {1}; }, "unexpected dataset '/elsewhere/x'");
  expect([](auto& m) { m.datasets["/model/bad name"] = {1}; }, "is not a parameter name");
  expect([](auto& m) { m.datasets["/optimizer/exp_avg/w"] = {6, 4}; }, "moments of 'w' have shape [6, 4]");
  expect([](auto& m) { m.datasets["/model/w"] = {4, -6}; }, "has shape");
  expect([](auto& m) { m.has_checksums = false; }, "missing dataset '/checksums'");
  expect([](auto& m) { m.datasets.erase("/optimizer/exp_avg_sq/w"); },
         "missing dataset '/optimizer/exp_avg_sq/w'");
  expect([](auto& m) { m.checksums += "00000001 0 24 0,0 4,6 /model/w\n"; },
         "covers an element of '/model/w'");
  expect([](auto& m) { m.checksums = m.checksums.substr(0, m.checksums.find('\n') + 1); },
         "covers 0 of the 24 elements of '/optimizer/exp_avg/w'");
  expect([](auto& m) { m.checksums.replace(m.checksums.find(" 0 10 "), 6, " 1 10 "); },
         "misses elements of '/optimizer/exp_avg/w'");
  expect([](auto& m) { m.checksums += "00000001 0 30 0,0 4,6 /model/w\n"; }, "outside the block");
  expect([](auto& m) { m.checksums += "00000001 0 3 3,0 2,6 /model/w\n"; }, "is outside '/model/w'");
  // Schema 1 (chunked, Fletcher32) has no table to check.
  CheckpointMeta old = good_meta();
  old.schema_version = 1, old.has_checksums = false;
  EXPECT_TRUE(check_checkpoint_meta(old).empty());
}
