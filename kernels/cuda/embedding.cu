// CUDA twin of kernels/host/embedding.cpp: the token embedding and its vocabulary-parallel shard
// (semantics in kernels/ops.hpp). Ids are checked in the kernel: the first position whose id lies
// outside [0, vocab) is recorded and the op throws after the launch, naming it (the backward checks
// every id before it touches the table gradient). The backward walks the tokens in order for each
// column (no atomics), so it is deterministic.
#include <vector>

#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"

namespace dsv3::cuda {

namespace {

constexpr int kThreads = 256;

// Rows outside [first, first + rows) give zeros; ids outside [0, vocab) are flagged (and give zeros).
__global__ void embedding_fwd_kernel(const int32_t* ids, const float* table, int64_t first, int64_t rows,
                                     int64_t vocab, float* out, int64_t T, int64_t D,
                                     unsigned long long* flag) {
  const int64_t n = T * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / D, j = i % D;
    const int64_t id = ids[t];
    if (id < 0 || id >= vocab) {
      if (j == 0) flag_position(flag, t);
      out[i] = 0.0f;
      continue;
    }
    const int64_t row = id - first;
    out[i] = row >= 0 && row < rows ? table[row * D + j] : 0.0f;
  }
}

__global__ void check_ids_kernel(const int32_t* ids, int64_t T, int64_t vocab, unsigned long long* flag) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t < T && (ids[t] < 0 || ids[t] >= vocab)) flag_position(flag, t);
}

// One thread per column, tokens in order: dtable[id - first, j] += dout[t, j] (ids checked before).
__global__ void embedding_bwd_kernel(const int32_t* ids, const float* dout, int64_t first, int64_t rows,
                                     float* dtable, int64_t T, int64_t D) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= D) return;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = int64_t(ids[t]) - first;
    if (row >= 0 && row < rows) dtable[row * D + j] += dout[t * D + j];
  }
}

void check_tensors(const char* op, const Tensor& ids, const Tensor& table, const Tensor& rows) {
  check_on_device(op, ids, DType::I32);
  check_on_device(op, table, DType::F32);
  check_on_device(op, rows, DType::F32);
}

[[noreturn]] void bad_id(const char* op, const Tensor& ids, int64_t pos, int64_t vocab, const Tensor& table,
                         bool shard) {
  int32_t id = 0;
  DSV3_CUDA_CHECK(cudaMemcpy(&id, ids.i32() + pos, sizeof(id), cudaMemcpyDeviceToHost));
  raise(op, ": tensor '", ids.name(), "' position ", pos, " holds id ", id, ", outside [0, ",
        shard ? "vocab) with vocab = " : "V) with V = ", vocab, " (table ", shard ? "shard '" : "'",
        table.name(), "')");
}

}  // namespace

void embedding_forward(const Tensor& ids, const Tensor& table, int64_t first, int64_t vocab,
                       const Tensor& out, bool shard) {
  const char* op = shard ? "embedding_shard_forward" : "embedding_forward";
  check_tensors(op, ids, table, out);
  const int64_t T = ids.dim(0), D = table.dim(1);
  if (T == 0) return;
  ErrorFlag flag;
  if (D > 0)
    embedding_fwd_kernel<<<blocks_for(T * D, kThreads), kThreads, 0, stream()>>>(
        ids.i32(), table.f32(), first, table.dim(0), vocab, out.f32(), T, D, flag.device());
  check_launch(op);
  const int64_t pos = flag.read();
  if (pos >= 0) bad_id(op, ids, pos, vocab, table, shard);
}

void embedding_backward(const Tensor& ids, const Tensor& dout, int64_t first, int64_t vocab,
                        const Tensor& dtable, bool shard) {
  const char* op = shard ? "embedding_shard_backward" : "embedding_backward";
  check_tensors(op, ids, dtable, dout);
  const int64_t T = ids.dim(0), D = dtable.dim(1);
  if (T == 0 || D == 0) return;
  {  // every id is checked before the table gradient is touched
    ErrorFlag flag;
    check_ids_kernel<<<blocks_for(T, kThreads), kThreads, 0, stream()>>>(ids.i32(), T, vocab, flag.device());
    check_launch(op);
    const int64_t pos = flag.read();
    if (pos >= 0) bad_id(op, ids, pos, vocab, dtable, shard);
  }
  embedding_bwd_kernel<<<blocks_for(D, kThreads), kThreads, 0, stream()>>>(ids.i32(), dout.f32(), first,
                                                                           dtable.dim(0), dtable.f32(), T, D);
  check_launch(op);
}

}  // namespace dsv3::cuda
