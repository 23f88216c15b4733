// Implementation of tensor.hpp.
#include "core/tensor.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <set>
#include <utility>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "core/device.hpp"
#include "core/error.hpp"

namespace dsv3 {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32:
      return 4;
    case DType::BF16:
      return 2;
    case DType::F8E4M3:
      return 1;
    case DType::I32:
      return 4;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "f32";
    case DType::BF16:
      return "bf16";
    case DType::F8E4M3:
      return "e4m3";
    case DType::I32:
      return "i32";
  }
  return "?";
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Tensor::Tensor(void* data, DType dtype, std::vector<int64_t> shape, std::string name, Device device)
    : data_(data), dtype_(dtype), device_(device), shape_(std::move(shape)), name_(std::move(name)) {
  for (int64_t d : shape_) DSV3_CHECK(d >= 0, "tensor '", name_, "' has a negative extent in ", shape_str());
}

float* Tensor::f32() const {
  DSV3_CHECK(dtype_ == DType::F32, "tensor '", name_, "' is ", dtype_name(dtype_), ", expected f32");
  return static_cast<float*>(data_);
}
int32_t* Tensor::i32() const {
  DSV3_CHECK(dtype_ == DType::I32, "tensor '", name_, "' is ", dtype_name(dtype_), ", expected i32");
  return static_cast<int32_t*>(data_);
}

int64_t Tensor::dim(int64_t i) const {
  const int64_t n = ndim();
  if (i < 0) i += n;
  DSV3_CHECK(i >= 0 && i < n, "tensor '", name_, "' ", shape_str(), " has no dimension ", i);
  return shape_[static_cast<size_t>(i)];
}

int64_t Tensor::numel() const { return numel_of(shape_); }

Tensor Tensor::view(std::vector<int64_t> shape, std::string name) const {
  DSV3_CHECK(numel_of(shape) == numel(), "view of tensor '", name_, "' ", shape_str(), " as ",
             shape_to_string(shape), " changes the element count");
  return Tensor(data_, dtype_, std::move(shape), name.empty() ? name_ : std::move(name), device_);
}

Tensor Tensor::rows(int64_t begin, int64_t end, std::string name) const {
  DSV3_CHECK(ndim() >= 1 && begin >= 0 && begin <= end && end <= shape_[0], "rows [", begin, ", ", end,
             ") out of range for tensor '", name_, "' ", shape_str());
  std::vector<int64_t> s = shape_;
  s[0] = end - begin;
  const int64_t row = shape_[0] ? numel() / shape_[0] : 0;
  char* p = static_cast<char*>(data_) + static_cast<size_t>(begin * row) * dtype_size(dtype_);
  return Tensor(p, dtype_, std::move(s), name.empty() ? name_ : std::move(name), device_);
}

Tensor Tensor::renamed(std::string name) const {
  Tensor t = *this;
  t.name_ = std::move(name);
  return t;
}

std::string Tensor::shape_str() const { return shape_to_string(shape_); }
std::string Tensor::describe() const { return name_ + shape_str() + " " + dtype_name(dtype_); }

void expect_shape(const char* op, const Tensor& t, std::initializer_list<int64_t> shape) {
  bool ok = t.ndim() == static_cast<int64_t>(shape.size());
  size_t i = 0;
  std::vector<int64_t> want;
  for (int64_t d : shape) {
    want.push_back(d);
    if (ok && d >= 0 && t.shape()[i] != d) ok = false;
    ++i;
  }
  if (!ok) {
    std::string w = "[";
    for (size_t j = 0; j < want.size(); ++j)
      w += (j ? ", " : "") + (want[j] < 0 ? std::string("*") : std::to_string(want[j]));
    raise(op, ": tensor '", t.name(), "' has shape ", t.shape_str(), ", expected ", w, "]");
  }
}

void expect_dtype(const char* op, const Tensor& t, DType dtype) {
  DSV3_CHECK(t.dtype() == dtype, op, ": tensor '", t.name(), "' is ", dtype_name(t.dtype()), ", expected ",
             dtype_name(dtype));
}

void expect_same_shape(const char* op, const Tensor& a, const Tensor& b) {
  DSV3_CHECK(a.shape() == b.shape(), op, ": tensors '", a.name(), "' ", a.shape_str(), " and '", b.name(),
             "' ", b.shape_str(), " must have the same shape");
}

namespace {
std::atomic<int64_t> g_live_bytes{0};
std::atomic<int64_t> g_peak_bytes{0};

// glibc serves a block of 128 KiB to 32 MiB with a mapping of its own at first and, once such a
// mapping is freed, raises its threshold and serves later blocks of that size from the heap. A fixed
// threshold at glibc's own maximum keeps the heap's behaviour the same from the first block on, for
// what still comes from it (small tensors, and the library's other allocations). Set when the library
// loads, before the first tensor.
#ifdef __GLIBC__
const bool g_malloc_threshold_fixed = [] { return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1; }();
#endif

// Host tensor storage of 64 KiB and more comes from a heap of its own: one address range mapped
// once (as large as the machine's memory, without reserving swap), blocks placed best fit, freed
// blocks merged with their free neighbours. Placed among the library's small allocations (names,
// shapes, vectors) in glibc's heap, the same tensors were split apart by whichever small blocks landed
// between them: the tiny config's peak resident memory in a training step moved by up to 8% with
// unrelated changes to the code, or with the length of the working directory's path. Here the layout
// follows the sequence of tensor allocations alone. Free pages stay resident, as a heap's do, until
// release_free_host_memory(). Without the mapping (a system that refuses it) or once it is full,
// tensors come from malloc as the small ones do.
class LargeBlocks {
 public:
  static constexpr size_t kMin = size_t(64) << 10;
  // A block takes its size in 64-byte lines plus one more line, so that blocks of a whole number of
  // pages, placed one after the other, do not all start at the same offset within a page (where the
  // streams of a kernel that reads and writes several of them would alias in the caches).
  static size_t rounded(size_t bytes) { return (bytes + 63) / 64 * 64 + 64; }

  void* alloc(size_t bytes) {
    const size_t n = rounded(bytes);
    std::lock_guard<std::mutex> lock(m_);
    if (!reserve()) return nullptr;
    auto fit = by_size_.lower_bound({n, 0});
    if (fit != by_size_.end()) {
      const size_t len = fit->first, off = fit->second;
      by_size_.erase(fit);
      by_offset_.erase(off);
      if (len > n) insert(off + n, len - n);
      return base_ + off;
    }
    if (n > size_ - top_) return nullptr;
    const size_t off = top_;
    top_ += n;
    touched_ = std::max(touched_, top_);
    return base_ + off;
  }
  bool owns(const void* p) const {  // without the lock: base_ is set once, before any block exists
    const char* c = static_cast<const char*>(p);
    const char* b = mapped_.load(std::memory_order_acquire);
    return b && c >= b && c < b + size_;
  }
  void free(void* p, size_t bytes) {
    size_t off = static_cast<size_t>(static_cast<char*>(p) - base_), n = rounded(bytes);
    std::lock_guard<std::mutex> lock(m_);
    auto next = by_offset_.lower_bound(off);
    if (next != by_offset_.end() && next->first == off + n) {
      n += next->second;
      by_size_.erase({next->second, next->first});
      next = by_offset_.erase(next);
    }
    if (next != by_offset_.begin()) {
      const auto prev = std::prev(next);
      if (prev->first + prev->second == off) {
        off = prev->first, n += prev->second;
        by_size_.erase({prev->second, prev->first});
        by_offset_.erase(prev);
      }
    }
    if (off + n == top_) {  // the end of the used range (its pages stay, for the next rise)
      top_ = off;
      return;
    }
    insert(off, n);
  }
  void release() {
    std::lock_guard<std::mutex> lock(m_);
    if (!base_) return;
    for (const auto& [off, len] : by_offset_) release_pages(off, off + len);
    if (touched_ > top_) release_pages(top_, touched_);
    touched_ = top_;
  }

 private:
  // Maps the range on first use: as large as the machine's memory, without reserving swap for it.
  bool reserve() {
    if (base_ || failed_) return base_ != nullptr;
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    const size_t want = pages > 0 && page > 0 ? size_t(pages) * size_t(page) : 0;
    void* p =
        want ? mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
             : MAP_FAILED;
    if (p == MAP_FAILED) {
      failed_ = true;
      return false;
    }
    base_ = static_cast<char*>(p), size_ = want;
    mapped_.store(base_, std::memory_order_release);
    return true;
  }
  // The whole pages within [begin, end) of the range.
  void release_pages(size_t begin, size_t end) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    begin = (begin + page - 1) / page * page, end = end / page * page;
    if (end > begin) madvise(base_ + begin, end - begin, MADV_DONTNEED);
  }
  void insert(size_t off, size_t len) {
    by_offset_.emplace(off, len);
    by_size_.emplace(len, off);
  }
  std::mutex m_;
  char* base_ = nullptr;
  std::atomic<char*> mapped_{nullptr};       // base_, for owns()
  size_t size_ = 0, top_ = 0, touched_ = 0;  // mapped, in use up to, used since the last release
  bool failed_ = false;
  std::map<size_t, size_t> by_offset_;           // free block: offset -> length
  std::set<std::pair<size_t, size_t>> by_size_;  // free block: (length, offset), best fit first
};
LargeBlocks& large_blocks() {
  static LargeBlocks* h = new LargeBlocks;  // never destroyed: tensors may outlive static destructors
  return *h;
}
}  // namespace

HostBufferStats host_buffer_stats() { return {g_live_bytes.load(), g_peak_bytes.load()}; }
void reset_host_buffer_peak() { g_peak_bytes.store(g_live_bytes.load()); }
void release_free_host_memory() { large_blocks().release(); }

void Buffer::Free::operator()(void* p) const {
  if (device != Device::Host) {
    device_memory(device).free(p);
    return;
  }
  if (large_blocks().owns(p))
    large_blocks().free(p, bytes);
  else
    std::free(p);
  g_live_bytes.fetch_sub(static_cast<int64_t>(bytes));
}

Buffer::Buffer(size_t bytes, Device device, Fill fill) : bytes_(bytes), device_(device) {
  if (device != Device::Host) {
    const DeviceMemoryOps& dev = device_memory(device);  // throws when the build lacks the backend
    void* p = bytes ? dev.alloc(bytes) : nullptr;
    if (p && fill == Fill::Zero) dev.zero(p, bytes);
#ifndef NDEBUG
    if (p && fill == Fill::Uninitialized) dev.fill_nan(p, bytes);
#endif
    ptr_ = std::unique_ptr<void, Free>(p, Free{bytes, device});
    return;
  }
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = rounded >= LargeBlocks::kMin ? large_blocks().alloc(rounded) : nullptr;
  if (!p && rounded) p = std::aligned_alloc(64, rounded);
  DSV3_CHECK(rounded == 0 || p != nullptr, "out of host memory allocating ", bytes, " bytes");
  if (p && fill == Fill::Zero) std::memset(p, 0, rounded);
#ifndef NDEBUG
  if (p && fill == Fill::Uninitialized) std::memset(p, 0xff, rounded);  // NaN in every f32 element
#endif
  ptr_ = std::unique_ptr<void, Free>(p, Free{rounded, Device::Host});
  if (p) {
    const int64_t now = g_live_bytes.fetch_add(static_cast<int64_t>(rounded)) + static_cast<int64_t>(rounded);
    int64_t peak = g_peak_bytes.load();
    while (now > peak && !g_peak_bytes.compare_exchange_weak(peak, now)) {
    }
  }
}

Tensor Buffer::tensor(DType dtype, std::vector<int64_t> shape, std::string name, size_t offset_bytes) const {
  const size_t need = offset_bytes + static_cast<size_t>(numel_of(shape)) * dtype_size(dtype);
  DSV3_CHECK(need <= bytes_, "tensor '", name, "' ", shape_to_string(shape), " at byte ", offset_bytes,
             " does not fit a buffer of ", bytes_, " bytes");
  return Tensor(static_cast<char*>(ptr_.get()) + offset_bytes, dtype, std::move(shape), std::move(name),
                device_);
}

void Buffer::zero() {
  if (!ptr_) return;
  if (device_ != Device::Host) {
    device_memory(device_).zero(ptr_.get(), bytes_);
    return;
  }
  std::memset(ptr_.get(), 0, bytes_);
}

OwnedTensor::OwnedTensor(DType dtype, std::vector<int64_t> shape, std::string name, Device device, Fill fill)
    : buffer(static_cast<size_t>(numel_of(shape)) * dtype_size(dtype), device, fill),
      t(buffer.tensor(dtype, std::move(shape), std::move(name))) {}

}  // namespace dsv3
