// A caching allocator for device memory: freed blocks go to a cache keyed by their rounded size and
// serve later requests of the same size class, so a training step, whose tensors have the same
// shapes every step, allocates from the device only during the first step. The raw allocator is a
// pair of functions (cudaMalloc/cudaFree in kernels/cuda; anything in the tests).
//
// Size classes: requests round up to 512 bytes below 1 MiB and to 2 MiB above, so a block serves
// any request of its class. A cached block is reused only by its own class (no splitting), which
// keeps the bookkeeping exact and the waste below 2 MiB a block.
//
// When the raw allocator fails, the cache is released to it and the request retried once; a second
// failure throws dsv3::Error with the request and the allocator's figures.
//
// Streams: a block freed here may be handed out again at once. That is safe for work ordered on one
// stream (the kernels that used the old tensor run before the kernels of the new one); a tensor used
// on another stream must be kept alive until an event says that stream is done with it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace dsv3 {

struct CachingAllocatorStats {
  int64_t raw_allocs = 0;      // calls to the raw allocator that succeeded
  int64_t raw_frees = 0;       // blocks given back to it
  int64_t cache_hits = 0;      // requests served from the cache
  int64_t requests = 0;        // all non-empty requests
  int64_t reserved_bytes = 0;  // held from the raw allocator (live + cached)
  int64_t live_bytes = 0;      // handed out and not yet freed (rounded sizes)
  int64_t peak_live_bytes = 0;
  int64_t peak_reserved_bytes = 0;
};

class CachingAllocator {
 public:
  using RawAlloc = void* (*)(size_t bytes, void* ctx);  // nullptr on failure
  using RawFree = void (*)(void* p, size_t bytes, void* ctx);

  CachingAllocator(std::string name, RawAlloc raw_alloc, RawFree raw_free, void* ctx = nullptr);
  ~CachingAllocator();  // gives every block back, cached or not
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  static size_t round_size(size_t bytes);

  void* allocate(size_t bytes);  // nullptr for 0 bytes
  void deallocate(void* p);      // p from allocate (or nullptr); throws on a pointer it never gave
  void release_cache();          // gives the cached blocks back to the raw allocator
  CachingAllocatorStats stats() const;
  void reset_peak();

 private:
  std::string name_;
  RawAlloc raw_alloc_;
  RawFree raw_free_;
  void* ctx_;
  mutable std::mutex mu_;
  std::unordered_map<void*, size_t> live_;       // block -> rounded size
  std::map<size_t, std::vector<void*>> cached_;  // rounded size -> free blocks
  CachingAllocatorStats st_;
  void release_cache_locked();
};

}  // namespace dsv3
