// Implementation of device.hpp.
#include "core/device.hpp"

#include <cstring>

#include "core/error.hpp"

namespace dsv3 {

namespace {
constexpr int kDevices = 2;
DeviceMemoryOps* registry() {
  static DeviceMemoryOps ops[kDevices];  // function-local: backends register during static init
  return ops;
}
}  // namespace

const char* device_name(Device device) {
  switch (device) {
    case Device::Host:
      return "host";
    case Device::Cuda:
      return "cuda";
  }
  return "?";
}

void register_device_memory(Device device, const DeviceMemoryOps& ops) {
  DSV3_CHECK(device != Device::Host, "register_device_memory: host memory needs no backend");
  registry()[static_cast<int>(device)] = ops;
}

bool device_available(Device device) {
  return device == Device::Host || registry()[static_cast<int>(device)].alloc != nullptr;
}

const DeviceMemoryOps& device_memory(Device device) {
  DSV3_CHECK(device != Device::Host, "device_memory: host storage is handled by Buffer itself");
  const DeviceMemoryOps& ops = registry()[static_cast<int>(device)];
  DSV3_CHECK(ops.alloc != nullptr, "this build has no ", device_name(device),
             " backend: configure with -DDSV3_ENABLE_CUDA=ON (make cuda) to use device '",
             device_name(device), "'");
  return ops;
}

void copy_tensor(const Tensor& dst, const Tensor& src) {
  DSV3_CHECK(dst.shape() == src.shape() && dst.dtype() == src.dtype(), "copy_tensor: '", src.describe(),
             "' on ", device_name(src.device()), " into '", dst.describe(), "' on ",
             device_name(dst.device()), ": shapes and dtypes must match");
  if (src.bytes() == 0) return;
  if (dst.device() == Device::Host && src.device() == Device::Host) {
    std::memmove(dst.data(), src.data(), src.bytes());
    return;
  }
  DSV3_CHECK(dst.device() == Device::Host || src.device() == Device::Host || dst.device() == src.device(),
             "copy_tensor: copies between two different devices go through the host");
  const Device dev = dst.device() == Device::Host ? src.device() : dst.device();
  device_memory(dev).copy(dst.data(), dst.device(), src.data(), src.device(), src.bytes());
}

OwnedTensor to_device(const Tensor& src, Device device) {
  OwnedTensor out(src.dtype(), src.shape(), src.name(), device, Fill::Uninitialized);
  copy_tensor(out.t, src);
  return out;
}

}  // namespace dsv3
