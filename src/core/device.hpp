// Storage on devices other than the host. core knows no device API: a backend library (kernels/cuda)
// registers, when it loads, the functions that allocate, clear and copy its memory, and Buffer,
// copy_tensor and to_device use them. A build without that backend refuses device storage with a
// message that says how to get it.
#pragma once

#include <cstddef>
#include <string>

#include "core/tensor.hpp"

namespace dsv3 {

struct DeviceMemoryOps {
  const char* name = "";                   // "cuda"
  void* (*alloc)(size_t bytes) = nullptr;  // throws dsv3::Error when out of memory
  void (*free)(void* p) = nullptr;         // p from alloc
  void (*zero)(void* p, size_t bytes) = nullptr;
  void (*fill_nan)(void* p, size_t bytes) = nullptr;  // 0xff bytes (debug builds' uninitialised fill)
  // Copies bytes between any two of host and this device; returns when dst holds them.
  void (*copy)(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes) = nullptr;
};

// Called once by a backend when its library loads.
void register_device_memory(Device device, const DeviceMemoryOps& ops);
// The functions for `device`; throws dsv3::Error naming the device when this build has none.
const DeviceMemoryOps& device_memory(Device device);
bool device_available(Device device);    // the build has the backend (not: a GPU is present)
const char* device_name(Device device);  // "host", "cuda"

// dst <- src for tensors of the same shape and dtype on any devices.
void copy_tensor(const Tensor& dst, const Tensor& src);
// A copy of src on `device` (same dtype, shape and name).
OwnedTensor to_device(const Tensor& src, Device device);

}  // namespace dsv3
