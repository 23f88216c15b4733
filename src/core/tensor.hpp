// Tensor: a non-owning, contiguous, row-major view (data pointer, dtype, device, shape, name) that
// every op takes; Buffer: owning storage on a device. No autograd: layers call forward and backward
// ops explicitly. Names travel with views so shape errors say which tensor was wrong.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace dsv3 {

// F8E4M3: FP8 E4M3 codes (core/lowp.hpp), one byte each; their block scales live in a separate f32 tensor.
enum class DType : uint8_t { F32, BF16, F8E4M3, I32 };
enum class Device : uint8_t { Host, Cuda };

size_t dtype_size(DType t);
const char* dtype_name(DType t);

class Tensor {
 public:
  Tensor() = default;
  Tensor(void* data, DType dtype, std::vector<int64_t> shape, std::string name = "",
         Device device = Device::Host);

  void* data() const { return data_; }
  float* f32() const;    // checks dtype F32
  int32_t* i32() const;  // checks dtype I32
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  const std::string& name() const { return name_; }
  int64_t ndim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t dim(int64_t i) const;  // negative counts from the end
  int64_t numel() const;
  size_t bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  bool defined() const { return data_ != nullptr || numel() == 0; }
  bool empty() const { return data_ == nullptr; }

  // Same storage, new shape with the same element count.
  Tensor view(std::vector<int64_t> shape, std::string name = "") const;
  // Rows [begin, end) along dimension 0 (contiguous).
  Tensor rows(int64_t begin, int64_t end, std::string name = "") const;
  Tensor renamed(std::string name) const;

  std::string shape_str() const;  // "[2, 3]"
  std::string describe() const;   // "name[2, 3] f32"

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::F32;
  Device device_ = Device::Host;
  std::vector<int64_t> shape_;
  std::string name_;
};

// Throws dsv3::Error "<op>: tensor 'q' has shape [2, 3], expected [2, 4]" unless t has `shape`
// (-1 in `shape` matches any extent).
void expect_shape(const char* op, const Tensor& t, std::initializer_list<int64_t> shape);
void expect_dtype(const char* op, const Tensor& t, DType dtype);
void expect_same_shape(const char* op, const Tensor& a, const Tensor& b);

// How new storage starts: zero-filled (the default) or uninitialised, for buffers the next op
// overwrites completely (saves a pass over memory per activation). Debug builds fill uninitialised
// storage with NaN bit patterns so a read before the first write shows up.
enum class Fill : uint8_t { Zero, Uninitialized };

// Owning storage on one device: 64-byte aligned host memory, or device memory from the backend that
// registered it (core/device.hpp; a build without one refuses device storage by name).
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t bytes, Device device = Device::Host, Fill fill = Fill::Zero);
  size_t bytes() const { return bytes_; }
  void* data() const { return ptr_.get(); }
  Device device() const { return device_; }
  Tensor tensor(DType dtype, std::vector<int64_t> shape, std::string name = "",
                size_t offset_bytes = 0) const;
  void zero();

 private:
  struct Free {
    Free() : bytes(0), device(Device::Host) {}
    Free(size_t b, Device d) : bytes(b), device(d) {}
    size_t bytes;
    Device device;
    void operator()(void* p) const;
  };
  std::unique_ptr<void, Free> ptr_;
  size_t bytes_ = 0;
  Device device_ = Device::Host;
};

// Bytes of host storage held by Buffers now, and the most held at once since the last reset: what the
// tensors themselves occupy, without the allocator's own overhead or other heap use.
struct HostBufferStats {
  int64_t live = 0;
  int64_t peak = 0;
};
HostBufferStats host_buffer_stats();
void reset_host_buffer_peak();
// Large host tensors (64 KiB and more) live in an address range of their own whose free pages stay
// resident for reuse, as a heap's do. This gives the pages of every free block back to the system
// (a later block placed there faults them in again); for a measurement's baseline, or after a phase
// that used more memory than the ones that follow.
void release_free_host_memory();

// A tensor together with its own storage (activations, test data).
struct OwnedTensor {
  Buffer buffer;
  Tensor t;
  OwnedTensor() = default;
  OwnedTensor(DType dtype, std::vector<int64_t> shape, std::string name = "", Device device = Device::Host,
              Fill fill = Fill::Zero);
  operator const Tensor&() const { return t; }
  float* f32() const { return t.f32(); }
  int32_t* i32() const { return t.i32(); }
};

int64_t numel_of(const std::vector<int64_t>& shape);
std::string shape_to_string(const std::vector<int64_t>& shape);

}  // namespace dsv3
