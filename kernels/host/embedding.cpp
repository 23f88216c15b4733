// Token embedding of kernels/ops.hpp: embedding_forward (row gather) and embedding_backward
// (scatter-add into the table gradient), and their vocabulary-parallel forms over a shard of the table
// (rows [first, first + Vs) of the full [vocab, D] table; ids outside the shard give zero rows).
//   ids [T] (i32), table / dtable [V, D] (or [Vs, D]), out / dout [T, D]
// Every id is checked against [0, V) (or [0, vocab)) before any memory is touched. GPU tensors go to
// the CUDA twin, kernels/cuda/embedding.cu.
#include "core/error.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

// Validates dtypes, devices and shapes; throws naming the tensor.
void check_embedding_shapes(const char* op, const Tensor& ids, const Tensor& table, const Tensor& rows) {
  expect_dtype(op, ids, DType::I32);
  expect_dtype(op, table, DType::F32);
  expect_dtype(op, rows, DType::F32);
  for (const Tensor* t : {&ids, &table, &rows}) host::check_backend(op, *t);
  DSV3_CHECK(ids.ndim() == 1, op, ": tensor '", ids.name(), "' has shape ", ids.shape_str(),
             ", expected [T]");
  DSV3_CHECK(table.ndim() == 2, op, ": tensor '", table.name(), "' has shape ", table.shape_str(),
             ", expected [V, D]");
  expect_shape(op, rows, {ids.dim(0), table.dim(1)});
}

// The ids of host tensors lie in [0, V); throws naming the position and the id.
void check_ids(const char* op, const Tensor& ids, const Tensor& table) {
  const int64_t T = ids.dim(0), V = table.dim(0);
  const int32_t* id = ids.i32();
  for (int64_t t = 0; t < T; ++t)
    DSV3_CHECK(id[t] >= 0 && id[t] < V, op, ": tensor '", ids.name(), "' position ", t, " holds id ", id[t],
               ", outside [0, V) with V = ", V, " (table '", table.name(), "')");
}

// The same for a shard: the table's rows [first, first + Vs) must lie inside [0, vocab).
void check_embedding_shard(const char* op, const Tensor& ids, const Tensor& table, int64_t first,
                           int64_t vocab, const Tensor& rows) {
  check_embedding_shapes(op, ids, table, rows);
  const int64_t Vs = table.dim(0);
  DSV3_CHECK(first >= 0 && Vs <= vocab && first <= vocab - Vs, op, ": shard rows [", first, ", ", first + Vs,
             ") of tensor '", table.name(), "' ", table.shape_str(), " do not fit the vocabulary [0, ", vocab,
             ")");
}

// Every id of host tensors inside the full vocabulary [0, vocab).
void check_shard_ids(const char* op, const Tensor& ids, int64_t vocab, const Tensor& table) {
  const int64_t T = ids.dim(0);
  const int32_t* id = ids.i32();
  for (int64_t t = 0; t < T; ++t)
    DSV3_CHECK(id[t] >= 0 && id[t] < vocab, op, ": tensor '", ids.name(), "' position ", t, " holds id ",
               id[t], ", outside [0, vocab) with vocab = ", vocab, " (table shard '", table.name(), "')");
}

}  // namespace

// out[t, :] = table[ids[t], :]
void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) {
  DSV3_PROFILE(Elementwise);
  const char* op = "embedding_forward";
  check_embedding_shapes(op, ids, table, out);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&ids, &table, &out}))
      return cuda::embedding_forward(ids, table, 0, table.dim(0), out, false);
  check_ids(op, ids, table);
  const int64_t D = table.dim(1);
  const int32_t* id = ids.i32();
  const float* tab = table.f32();
  float* o = out.f32();
  host::parallel_for("dsv3::embedding_forward", ids.dim(0), [=](int64_t t) {
    const float* src = tab + static_cast<int64_t>(id[t]) * D;
    float* dst = o + t * D;
    for (int64_t j = 0; j < D; ++j) dst[j] = src[j];
  });
}

// dtable[ids[t], :] += dout[t, :]. Ids may repeat, so the parallel loop runs over blocks of 64
// columns (each block of dtable is owned by one iteration) and walks the tokens in order.
void embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) {
  DSV3_PROFILE(Elementwise);
  const char* op = "embedding_backward";
  check_embedding_shapes(op, ids, dtable, dout);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&ids, &dout, &dtable}))
      return cuda::embedding_backward(ids, dout, 0, dtable.dim(0), dtable, false);
  check_ids(op, ids, dtable);
  constexpr int64_t kBlock = 64;
  const int64_t T = ids.dim(0), D = dtable.dim(1);
  const int32_t* id = ids.i32();
  const float* g = dout.f32();
  float* dt = dtable.f32();
  host::parallel_for("dsv3::embedding_backward", (D + kBlock - 1) / kBlock, [=](int64_t blk) {
    const int64_t j0 = blk * kBlock, j1 = j0 + kBlock < D ? j0 + kBlock : D;
    for (int64_t t = 0; t < T; ++t) {
      float* dst = dt + static_cast<int64_t>(id[t]) * D;
      const float* src = g + t * D;
      for (int64_t j = j0; j < j1; ++j) dst[j] += src[j];
    }
  });
}

// out[t, :] = table[ids[t] - first, :] for ids in [first, first + Vs), 0 otherwise.
void embedding_shard_forward(const Tensor& ids, const Tensor& table, int64_t first, int64_t vocab,
                             const Tensor& out) {
  DSV3_PROFILE(Elementwise);
  const char* op = "embedding_shard_forward";
  check_embedding_shard(op, ids, table, first, vocab, out);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&ids, &table, &out}))
      return cuda::embedding_forward(ids, table, first, vocab, out, true);
  check_shard_ids(op, ids, vocab, table);
  const int64_t Vs = table.dim(0), D = table.dim(1);
  const int32_t* id = ids.i32();
  const float* tab = table.f32();
  float* o = out.f32();
  host::parallel_for("dsv3::embedding_shard_forward", ids.dim(0), [=](int64_t t) {
    const int64_t row = static_cast<int64_t>(id[t]) - first;
    float* dst = o + t * D;
    if (row < 0 || row >= Vs) {
      for (int64_t j = 0; j < D; ++j) dst[j] = 0.0f;
      return;
    }
    const float* src = tab + row * D;
    for (int64_t j = 0; j < D; ++j) dst[j] = src[j];
  });
}

// dtable[ids[t] - first, :] += dout[t, :] for ids in the shard; blocked over columns like
// embedding_backward so repeated ids never race.
void embedding_shard_backward(const Tensor& ids, const Tensor& dout, int64_t first, int64_t vocab,
                              const Tensor& dtable) {
  DSV3_PROFILE(Elementwise);
  const char* op = "embedding_shard_backward";
  check_embedding_shard(op, ids, dtable, first, vocab, dout);
  if constexpr (host::kCuda)
    if (host::on_cuda(op, {&ids, &dout, &dtable}))
      return cuda::embedding_backward(ids, dout, first, vocab, dtable, true);
  check_shard_ids(op, ids, vocab, dtable);
  constexpr int64_t kBlock = 64;
  const int64_t T = ids.dim(0), Vs = dtable.dim(0), D = dtable.dim(1);
  const int32_t* id = ids.i32();
  const float* g = dout.f32();
  float* dt = dtable.f32();
  host::parallel_for("dsv3::embedding_shard_backward", (D + kBlock - 1) / kBlock, [=](int64_t blk) {
    const int64_t j0 = blk * kBlock, j1 = j0 + kBlock < D ? j0 + kBlock : D;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = static_cast<int64_t>(id[t]) - first;
      if (row < 0 || row >= Vs) continue;
      float* dst = dt + row * D;
      const float* src = g + t * D;
      for (int64_t j = j0; j < j1; ++j) dst[j] += src[j];
    }
  });
}

}  // namespace dsv3::ops
