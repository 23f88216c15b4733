// Implementation of tensor.hpp.
#include "core/tensor.hpp"

#include <atomic>
#include <cstdlib>
#include <cstring>
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
// mapping is freed, raises its threshold and serves later blocks of that size from the heap. Under a
// training step's mix of saved activations and temporaries that switch leaves several MiB of freed
// heap resident at the peak (10-17% of the tiny config's footprint). A fixed threshold at glibc's own
// maximum keeps every tensor below 32 MiB on the heap, where freed blocks are reused without page
// faults, and maps the larger ones alone. Set when the library loads, before the first tensor.
#ifdef __GLIBC__
const bool g_malloc_threshold_fixed = [] { return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1; }();
#endif
}  // namespace

HostBufferStats host_buffer_stats() { return {g_live_bytes.load(), g_peak_bytes.load()}; }
void reset_host_buffer_peak() { g_peak_bytes.store(g_live_bytes.load()); }

void Buffer::Free::operator()(void* p) const {
  if (device != Device::Host) {
    device_memory(device).free(p);
    return;
  }
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
  void* p = rounded ? std::aligned_alloc(64, rounded) : nullptr;
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
