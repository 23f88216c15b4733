// The heap of large host tensors (core/tensor.cpp): tensors of 64 KiB and more are placed best fit
// in an address range of their own, so their layout follows the sequence of tensor allocations alone,
// whatever small allocations come between them; free neighbours merge; free pages stay resident until
// release_free_host_memory(). Each test starts from an empty heap (no host tensor alive), which
// holds under ctest, where every test runs in a process of its own, and in a whole run of the suite,
// whose other tests free their tensors.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.hpp"

namespace dsv3 {
namespace {

constexpr int64_t KiB = 1024;

// A host tensor of `bytes` bytes.
OwnedTensor block(int64_t bytes, Fill fill = Fill::Uninitialized) {
  return OwnedTensor(DType::F8E4M3, {bytes}, "block", Device::Host, fill);
}
const char* at(const OwnedTensor& t) { return static_cast<const char*>(t.t.data()); }

// The process's anonymous resident memory, in bytes.
int64_t rss_anon() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("RssAnon:", 0) == 0) return std::stoll(line.substr(8)) * KiB;
  return -1;
}

TEST(HostHeap, LargeTensorsAreLaidOutTheSameWhateverSmallAllocationsComeBetween) {
  ASSERT_EQ(host_buffer_stats().live, 0) << "the test needs an empty heap";
  // Offsets of a sequence of tensors from the first, with and without small allocations between them.
  const auto offsets = [](bool small_between) {
    std::vector<std::unique_ptr<char[]>> small;
    std::vector<OwnedTensor> small_tensors;
    std::vector<OwnedTensor> big;
    for (int64_t kib : {256, 100, 64, 1000, 300}) {
      if (small_between) {
        for (int i = 0; i < 20; ++i) small.emplace_back(new char[16 + 61 * i]);
        small_tensors.push_back(block(4 * KiB));
        small_tensors.push_back(block(63 * KiB));
      }
      big.push_back(block(kib * KiB));
    }
    big[1] = OwnedTensor();  // a hole between the first and third
    big.push_back(block(90 * KiB));
    std::vector<int64_t> off;
    for (const OwnedTensor& t : big)
      if (!t.t.empty()) off.push_back(at(t) - at(big[0]));
    return off;
  };
  const std::vector<int64_t> plain = offsets(false), mixed = offsets(true);
  EXPECT_EQ(plain, mixed);
  // One after another, each taking its size plus one 64-byte line; the last one fills the hole.
  ASSERT_EQ(plain.size(), 5u);
  EXPECT_EQ(plain[1], 256 * KiB + 64 + 100 * KiB + 64);
  EXPECT_EQ(plain[4], 256 * KiB + 64);
}

TEST(HostHeap, FreeNeighboursMergeAndTheBestFitIsTaken) {
  ASSERT_EQ(host_buffer_stats().live, 0) << "the test needs an empty heap";
  OwnedTensor a = block(300 * KiB), b = block(200 * KiB), c = block(300 * KiB), d = block(100 * KiB),
              e = block(160 * KiB), f = block(100 * KiB);
  const char* a0 = at(a);
  const char* b0 = at(b);
  const char* e0 = at(e);
  b = OwnedTensor(), e = OwnedTensor();  // holes of 200 and 160 KiB
  OwnedTensor g = block(150 * KiB);      // fits both: the smaller one is taken
  EXPECT_EQ(at(g), e0);
  OwnedTensor h = block(180 * KiB);  // fits the 200 KiB hole only
  EXPECT_EQ(at(h), b0);
  // a, the rest of b's hole and h merge: 500 KiB fit where a began.
  a = OwnedTensor(), h = OwnedTensor();
  OwnedTensor i = block(500 * KiB);
  EXPECT_EQ(at(i), a0);
  // Everything freed: the range is empty again and the next tensor starts where the first did.
  for (OwnedTensor* t : {&c, &d, &f, &g, &i}) *t = OwnedTensor();
  EXPECT_EQ(host_buffer_stats().live, 0);
  OwnedTensor j = block(1000 * KiB);
  EXPECT_EQ(at(j), a0);
}

TEST(HostHeap, BlocksKeepTheirBytesAndZeroFillHoldsOnReuse) {
  ASSERT_EQ(host_buffer_stats().live, 0) << "the test needs an empty heap";
  std::vector<OwnedTensor> t;
  for (int k = 0; k < 12; ++k) {
    t.push_back(block((64 + 37 * k) * KiB + 5 * k));
    std::memset(t.back().t.data(), k + 1, static_cast<size_t>(t.back().t.numel()));
  }
  for (int k = 1; k < 12; k += 3) t[k] = OwnedTensor();  // holes, then blocks placed in them
  for (int k = 1; k < 12; k += 3) {
    t[k] = block((64 + 20 * k) * KiB, Fill::Zero);
    const auto* p = static_cast<const uint8_t*>(t[k].t.data());
    for (int64_t i = 0; i < t[k].t.numel(); ++i) ASSERT_EQ(p[i], 0) << "block " << k << " byte " << i;
    std::memset(t[k].t.data(), 100 + k, static_cast<size_t>(t[k].t.numel()));
  }
  for (int k = 0; k < 12; ++k) {
    const uint8_t want = (k % 3 == 1) ? uint8_t(100 + k) : uint8_t(k + 1);
    const auto* p = static_cast<const uint8_t*>(t[k].t.data());
    for (int64_t i = 0; i < t[k].t.numel(); ++i) ASSERT_EQ(p[i], want) << "block " << k << " byte " << i;
  }
}

TEST(HostHeap, FreePagesStayResidentUntilReleased) {
  ASSERT_EQ(host_buffer_stats().live, 0) << "the test needs an empty heap";
  const int64_t size = 64 << 20;
  release_free_host_memory();  // what earlier tests left resident
  const int64_t before = rss_anon();
  ASSERT_GT(before, 0);
  {
    OwnedTensor big = block(size, Fill::Zero);  // every page touched
    EXPECT_GT(rss_anon() - before, size * 9 / 10);
  }
  EXPECT_GT(rss_anon() - before, size * 9 / 10) << "a freed block's pages stay for reuse";
  release_free_host_memory();
  EXPECT_LT(rss_anon() - before, size / 10) << "release_free_host_memory gives them back";
  // Reusable afterwards.
  OwnedTensor again = block(size, Fill::Zero);
  EXPECT_EQ(static_cast<const uint8_t*>(again.t.data())[size - 1], 0);
}

}  // namespace
}  // namespace dsv3
