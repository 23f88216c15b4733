// Implementation of caching_allocator.hpp.
#include "core/caching_allocator.hpp"

#include <algorithm>

#include "core/error.hpp"

namespace dsv3 {

namespace {
constexpr size_t kSmallStep = 512;
constexpr size_t kLargeStep = size_t(2) << 20;
constexpr size_t kSmallLimit = size_t(1) << 20;

std::string mib(int64_t bytes) {
  return std::to_string(bytes / (1 << 20)) + "." + std::to_string((bytes % (1 << 20)) * 10 / (1 << 20)) +
         " MiB";
}
}  // namespace

CachingAllocator::CachingAllocator(std::string name, RawAlloc raw_alloc, RawFree raw_free, void* ctx)
    : name_(std::move(name)), raw_alloc_(raw_alloc), raw_free_(raw_free), ctx_(ctx) {}

CachingAllocator::~CachingAllocator() {
  std::lock_guard<std::mutex> lock(mu_);
  release_cache_locked();
  for (const auto& [p, bytes] : live_) raw_free_(p, bytes, ctx_);
  live_.clear();
}

size_t CachingAllocator::round_size(size_t bytes) {
  const size_t step = bytes < kSmallLimit ? kSmallStep : kLargeStep;
  return (bytes + step - 1) / step * step;
}

void* CachingAllocator::allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  const size_t size = round_size(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  ++st_.requests;
  void* p = nullptr;
  auto it = cached_.find(size);
  if (it != cached_.end() && !it->second.empty()) {
    p = it->second.back();
    it->second.pop_back();
    ++st_.cache_hits;
  } else {
    p = raw_alloc_(size, ctx_);
    if (p == nullptr && !cached_.empty()) {
      release_cache_locked();
      p = raw_alloc_(size, ctx_);
    }
    DSV3_CHECK(p != nullptr, name_, ": out of memory allocating ", bytes, " bytes (", mib(int64_t(size)),
               "); ", mib(st_.live_bytes), " in use by tensors, ", mib(st_.reserved_bytes),
               " reserved, peak in use ", mib(st_.peak_live_bytes));
    ++st_.raw_allocs;
    st_.reserved_bytes += int64_t(size);
    st_.peak_reserved_bytes = std::max(st_.peak_reserved_bytes, st_.reserved_bytes);
  }
  live_.emplace(p, size);
  st_.live_bytes += int64_t(size);
  st_.peak_live_bytes = std::max(st_.peak_live_bytes, st_.live_bytes);
  return p;
}

void CachingAllocator::deallocate(void* p) {
  if (p == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(p);
  DSV3_CHECK(it != live_.end(), name_, ": freeing a pointer it did not allocate (or freed twice)");
  cached_[it->second].push_back(p);
  st_.live_bytes -= int64_t(it->second);
  live_.erase(it);
}

void CachingAllocator::release_cache_locked() {
  for (auto& [size, blocks] : cached_) {
    for (void* p : blocks) {
      raw_free_(p, size, ctx_);
      ++st_.raw_frees;
      st_.reserved_bytes -= int64_t(size);
    }
  }
  cached_.clear();
}

void CachingAllocator::release_cache() {
  std::lock_guard<std::mutex> lock(mu_);
  release_cache_locked();
}

CachingAllocatorStats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return st_;
}

void CachingAllocator::reset_peak() {
  std::lock_guard<std::mutex> lock(mu_);
  st_.peak_live_bytes = st_.live_bytes;
  st_.peak_reserved_bytes = st_.reserved_bytes;
}

}  // namespace dsv3
