// Implementation of cuda_common.cuh, and the device memory of core/device.hpp for Device::Cuda: a
// caching allocator over cudaMalloc (no cudaMalloc on the step path once the first step has run),
// registered when the library loads.
#include <cstring>
#include <mutex>

#include "core/caching_allocator.hpp"
#include "core/device.hpp"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"

namespace dsv3::cuda {

void raise_cuda(const char* what, cudaError_t e, const char* file, int line) {
  raise("CUDA error ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ") in ", what, " at ", file, ":",
        line);
}

void raise_cublas(const char* what, cublasStatus_t s, const char* file, int line) {
  raise("cuBLAS error ", cublasGetStatusName(s), " (", cublasGetStatusString(s), ") in ", what, " at ", file,
        ":", line);
}

namespace {

struct Streams {
  cudaStream_t s[3] = {};
  cublasHandle_t blas = nullptr;
  Streams() {
    for (auto& st : s) DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    DSV3_CUBLAS_CHECK(cublasCreate(&blas));
    DSV3_CUBLAS_CHECK(cublasSetStream(blas, s[0]));
    // fp32 GEMMs in full fp32 (no TF32), so the fp32 path matches the host backend.
    DSV3_CUBLAS_CHECK(cublasSetMathMode(blas, CUBLAS_PEDANTIC_MATH));
  }
};

Streams& streams() {
  static Streams* st = new Streams();  // never destroyed: the driver may be gone at exit
  return *st;
}

void* raw_alloc(size_t bytes, void*) {
  void* p = nullptr;
  if (cudaMalloc(&p, bytes) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of a failed allocation
    return nullptr;
  }
  return p;
}

void raw_free(void* p, size_t, void*) { cudaFree(p); }

CachingAllocator& allocator() {
  static CachingAllocator* a = new CachingAllocator("cuda device memory", raw_alloc, raw_free);
  return *a;
}

void* dev_alloc(size_t bytes) {
  // Allocation is stream-ordered with the compute stream: blocks freed by earlier ops are reused by
  // later ones on the same stream (core/caching_allocator.hpp).
  return allocator().allocate(bytes);
}
void dev_free(void* p) { allocator().deallocate(p); }
void dev_zero(void* p, size_t bytes) { DSV3_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream())); }
void dev_fill_nan(void* p, size_t bytes) { DSV3_CUDA_CHECK(cudaMemsetAsync(p, 0xff, bytes, stream())); }
void dev_copy(void* dst, Device dd, const void* src, Device sd, size_t bytes) {
  const cudaMemcpyKind kind = dd == Device::Host   ? cudaMemcpyDeviceToHost
                              : sd == Device::Host ? cudaMemcpyHostToDevice
                                                   : cudaMemcpyDeviceToDevice;
  DSV3_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, stream()));
  // A copy returns when dst holds the bytes (device to device stays ordered on the stream).
  if (kind != cudaMemcpyDeviceToDevice) DSV3_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

const bool g_registered = [] {
  DeviceMemoryOps ops;
  ops.name = "cuda";
  ops.alloc = dev_alloc;
  ops.free = dev_free;
  ops.zero = dev_zero;
  ops.fill_nan = dev_fill_nan;
  ops.copy = dev_copy;
  register_device_memory(Device::Cuda, ops);
  return true;
}();

}  // namespace

cudaStream_t stream(Stream s) { return streams().s[static_cast<int>(s)]; }
cublasHandle_t cublas() { return streams().blas; }

void check_on_device(const char* op, const Tensor& t, DType dtype) {
  DSV3_CHECK(t.device() == Device::Cuda, op, ": tensor '", t.name(), "' is on the host, expected the GPU");
  expect_dtype(op, t, dtype);
}

void check_launch(const char* op) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    raise(op, ": kernel launch failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

DeviceMemoryStats memory_stats() {
  const CachingAllocatorStats s = allocator().stats();
  DeviceMemoryStats out;
  out.in_use = s.live_bytes;
  out.peak_in_use = s.peak_live_bytes;
  out.reserved = s.reserved_bytes;
  out.peak_reserved = s.peak_reserved_bytes;
  out.device_allocs = s.raw_allocs;
  return out;
}

void reset_memory_peak() { allocator().reset_peak(); }

ErrorFlag::ErrorFlag() {
  d_ = static_cast<unsigned long long*>(allocator().allocate(sizeof(unsigned long long)));
  DSV3_CUDA_CHECK(cudaMemsetAsync(d_, 0xff, sizeof(unsigned long long), stream()));  // none: all ones
}
ErrorFlag::~ErrorFlag() { allocator().deallocate(d_); }
int64_t ErrorFlag::read() const {
  unsigned long long v = 0;
  DSV3_CUDA_CHECK(cudaMemcpyAsync(&v, d_, sizeof(v), cudaMemcpyDeviceToHost, stream()));
  DSV3_CUDA_CHECK(cudaStreamSynchronize(stream()));
  return v == ~0ull ? -1 : static_cast<int64_t>(v);
}

void synchronize() { DSV3_CUDA_CHECK(cudaDeviceSynchronize()); }

}  // namespace dsv3::cuda

// Referenced by a linker option of dsv3_kernels (kernels/CMakeLists.txt), so every program linked
// with the kernels keeps this object and with it the registration above.
extern "C" {
int dsv3_cuda_backend_anchor = 1;
}
