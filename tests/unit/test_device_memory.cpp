// Device storage plumbing (core/device.hpp, core/caching_allocator.hpp), tested without a GPU: the
// caching allocator over a counting raw allocator, and Buffer/copy_tensor over a stand-in device
// whose memory is host memory, registered where the build has no real device backend.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <set>
#include <string>

#include "core/caching_allocator.hpp"
#include "core/device.hpp"
#include "core/error.hpp"
#include "ops.hpp"

namespace dsv3 {
namespace {

struct RawCounter {
  int64_t allocs = 0, frees = 0, bytes_out = 0;
  int64_t fail_above = -1;  // a raw allocation that would take bytes_out above this fails
  std::set<void*> out;
};

void* counting_alloc(size_t bytes, void* ctx) {
  auto* c = static_cast<RawCounter*>(ctx);
  if (c->fail_above >= 0 && c->bytes_out + int64_t(bytes) > c->fail_above) return nullptr;
  void* p = std::malloc(bytes);
  ++c->allocs;
  c->bytes_out += int64_t(bytes);
  c->out.insert(p);
  return p;
}

void counting_free(void* p, size_t bytes, void* ctx) {
  auto* c = static_cast<RawCounter*>(ctx);
  ASSERT_EQ(c->out.erase(p), 1u) << "raw free of a pointer the raw allocator did not give";
  ++c->frees;
  c->bytes_out -= int64_t(bytes);
  std::free(p);
}

TEST(CachingAllocator, SizeClasses) {
  EXPECT_EQ(CachingAllocator::round_size(1), 512u);
  EXPECT_EQ(CachingAllocator::round_size(512), 512u);
  EXPECT_EQ(CachingAllocator::round_size(513), 1024u);
  EXPECT_EQ(CachingAllocator::round_size((1 << 20) - 1), size_t(1) << 20);
  EXPECT_EQ(CachingAllocator::round_size(1 << 20), size_t(2) << 20);
  EXPECT_EQ(CachingAllocator::round_size((size_t(2) << 20) + 1), size_t(4) << 20);
}

// The same sequence of shapes twice (two training steps): the second is served from the cache.
TEST(CachingAllocator, SecondStepMakesNoRawAllocations) {
  RawCounter raw;
  {
    CachingAllocator a("test", counting_alloc, counting_free, &raw);
    const size_t sizes[] = {100, 4096, 3 << 20, 700, 4096, 5 << 20};
    for (int step = 0; step < 2; ++step) {
      std::vector<void*> held;
      for (size_t s : sizes) held.push_back(a.allocate(s));
      std::set<void*> distinct(held.begin(), held.end());
      EXPECT_EQ(distinct.size(), held.size()) << "two live tensors share a block";
      for (void* p : held) a.deallocate(p);
      if (step == 0) {
        EXPECT_EQ(raw.allocs, 6);
      }
    }
    const auto st = a.stats();
    EXPECT_EQ(raw.allocs, 6) << "the second step allocated from the raw allocator";
    EXPECT_EQ(st.raw_allocs, 6);
    EXPECT_EQ(st.cache_hits, 6);
    EXPECT_EQ(st.requests, 12);
    EXPECT_EQ(st.live_bytes, 0);
    const int64_t total = 512 + 4096 + (4 << 20) + 1024 + 4096 + (6 << 20);
    EXPECT_EQ(st.peak_live_bytes, total);
    EXPECT_EQ(st.reserved_bytes, total);
    EXPECT_EQ(a.allocate(0), nullptr);
    a.deallocate(nullptr);
  }
  EXPECT_EQ(raw.frees, 6) << "the destructor must give every block back";
  EXPECT_EQ(raw.bytes_out, 0);
}

TEST(CachingAllocator, OutOfMemoryReleasesTheCacheThenNamesTheRequest) {
  RawCounter raw;
  raw.fail_above = 8 << 20;
  CachingAllocator a("cuda:0", counting_alloc, counting_free, &raw);
  void* small = a.allocate(3 << 20);  // class 4 MiB
  a.deallocate(small);                // cached
  void* big = a.allocate(6 << 20);    // 6 MiB + 4 cached > 8: the cache goes back, then it fits
  ASSERT_NE(big, nullptr);
  EXPECT_EQ(raw.frees, 1);
  EXPECT_EQ(a.stats().reserved_bytes, 6 << 20);
  try {
    a.allocate(4 << 20);
    FAIL() << "expected an out-of-memory error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cuda:0: out of memory allocating 4194304 bytes"), std::string::npos) << m;
    EXPECT_NE(m.find("6.0 MiB in use by tensors"), std::string::npos) << m;
  }
  a.deallocate(big);
  int foreign = 0;
  EXPECT_THROW(a.deallocate(&foreign), Error);
}

// A stand-in device: host memory behind the DeviceMemoryOps interface, counted.
int64_t g_fake_live = 0;
void* fake_alloc(size_t bytes) {
  g_fake_live += int64_t(bytes);
  return std::malloc(bytes);
}
void fake_free(void* p) { std::free(p); }
void fake_zero(void* p, size_t bytes) { std::memset(p, 0, bytes); }
void fake_nan(void* p, size_t bytes) { std::memset(p, 0xff, bytes); }
void fake_copy(void* dst, Device, const void* src, Device, size_t bytes) { std::memcpy(dst, src, bytes); }

TEST(DeviceMemory, ABuildWithoutTheBackendRefusesDeviceStorageByName) {
  if (device_available(Device::Cuda)) GTEST_SKIP() << "this build has the CUDA backend";
  try {
    OwnedTensor t(DType::F32, {4}, "x", Device::Cuda);
    FAIL() << "expected a refusal";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no cuda backend: configure with -DDSV3_ENABLE_CUDA=ON"),
              std::string::npos)
        << e.what();
  }
}

TEST(DeviceMemory, BuffersAndCopiesGoThroughTheRegisteredBackend) {
  if (device_available(Device::Cuda)) GTEST_SKIP() << "this build has the CUDA backend";
  DeviceMemoryOps ops;
  ops.name = "fake";
  ops.alloc = fake_alloc;
  ops.free = fake_free;
  ops.zero = fake_zero;
  ops.fill_nan = fake_nan;
  ops.copy = fake_copy;
  register_device_memory(Device::Cuda, ops);
  EXPECT_TRUE(device_available(Device::Cuda));
  OwnedTensor h(DType::F32, {2, 3}, "h");
  for (int i = 0; i < 6; ++i) h.f32()[i] = 1.5f * float(i);
  const int64_t before = g_fake_live;
  OwnedTensor d = to_device(h, Device::Cuda);
  EXPECT_EQ(g_fake_live - before, 24);
  EXPECT_EQ(d.t.device(), Device::Cuda);
  EXPECT_EQ(d.t.name(), "h");
  OwnedTensor back(DType::F32, {2, 3}, "back");
  copy_tensor(back, d);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(back.f32()[i], 1.5f * float(i));
  d.buffer.zero();
  copy_tensor(back, d);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(back.f32()[i], 0.0f);
  OwnedTensor wrong(DType::F32, {3, 2}, "wrong");
  EXPECT_THROW(copy_tensor(wrong, d), Error);
  // A host op handed a device tensor refuses it, naming the op and the tensor.
  OwnedTensor y(DType::F32, {2, 3}, "y", Device::Cuda);
  try {
    ops::add_inplace(y, h);
    FAIL() << "expected a refusal";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'y'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dsv3
