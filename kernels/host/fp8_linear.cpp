// FP8 linear layers on the host (kernels/ops.hpp, "FP8 linear layers"): quantize to E4M3 with tile or
// block scales, then per 128-wide chunk of K an fp32 GEMM of the E4M3 values (exact products, fp32
// sums) whose result, times the two scales, is added to an fp32 accumulator.
#include <cblas.h>
#include <sys/mman.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/lowp.hpp"
#include "host/host_common.hpp"
#include "ops.hpp"
#include "profile.hpp"

namespace dsv3::ops {

namespace {

using host::check_2d;

// A buffer mapped on its own and kept between calls, growing to the largest request: the per-call
// memory of the FP8 GEMMs, so that a step's many GEMMs neither fault in fresh pages nor leave freed
// blocks of every size in the heap between the saved activations (where they would raise the heap's
// high-water mark).
class Mapped {
 public:
  ~Mapped() { release(); }
  void* get(size_t bytes, const char* what) {
    if (bytes > size_) {
      release();
      void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      DSV3_CHECK(p != MAP_FAILED, what, ": cannot map ", bytes, " bytes");
      data_ = p, size_ = bytes;
    }
    return data_;
  }

 private:
  void release() {
    if (data_) munmap(data_, size_);
    data_ = nullptr, size_ = 0;
  }
  void* data_ = nullptr;
  size_t size_ = 0;
};

// fp8_gemm's scratch: the decoded operands, the accumulator and a chunk's partials; it grows to the
// largest single GEMM (the size the memory accounting counts for it).
float* gemm_scratch(int64_t n) {
  thread_local Mapped m;
  return static_cast<float*>(m.get(static_cast<size_t>(n) * sizeof(float), "fp8_gemm scratch"));
}

constexpr int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }
// The shape of an operand's scales: one per 1 x 128 tile, or per 128 x 128 block.
std::vector<int64_t> scale_shape(int64_t rows, int64_t k, bool blocks) {
  return {blocks ? lowp::tiles(rows) : rows, lowp::tiles(k)};
}
int64_t scale_count(int64_t rows, int64_t k, bool blocks) { return numel_of(scale_shape(rows, k, blocks)); }
int64_t operand_bytes(int64_t rows, int64_t k, bool blocks) {
  return align64(rows * k) + align64(4 * scale_count(rows, k, blocks));
}

// The operands one fp8_linear_* call quantizes for its GEMM, carved from a per-thread buffer that is
// reserved whole at the start of the call (an operand taken from it lives until the next call).
class OperandArena {
 public:
  OperandArena(int64_t bytes, const char* op) {
    thread_local Mapped m;
    next_ = static_cast<char*>(m.get(static_cast<size_t>(bytes), op)), end_ = next_ + bytes;
  }
  uint8_t* take(int64_t bytes) {
    DSV3_CHECK(end_ - next_ >= align64(bytes), "fp8 operand arena: ", bytes, " bytes requested, ",
               end_ - next_, " left");
    char* p = next_;
    next_ += align64(bytes);
    return reinterpret_cast<uint8_t*>(p);
  }
  // An operand whose codes and scales live here (no storage of its own).
  Fp8Operand operand(int64_t rows, int64_t k, bool blocks, const std::string& name) {
    Fp8Operand q;
    q.blocks = blocks;
    q.codes.t = Tensor(take(rows * k), DType::F8E4M3, {rows, k}, name + ".e4m3", Device::Host);
    q.scales.t = Tensor(take(4 * scale_count(rows, k, blocks)), DType::F32, scale_shape(rows, k, blocks),
                        name + ".scale", Device::Host);
    return q;
  }

 private:
  char* next_;
  char* end_;
};

// Calls f with a's values: a const float* (f32) or a const uint16_t* (bf16 bit patterns).
template <typename F>
void with_values(const char* op, const Tensor& a, F&& f) {
  host::check_host(op, a);
  if (a.dtype() == DType::BF16) return f(static_cast<const uint16_t*>(a.data()));
  DSV3_CHECK(a.dtype() == DType::F32, op, ": tensor '", a.name(), "' has dtype ", dtype_name(a.dtype()),
             ", expected f32 or bf16");
  f(static_cast<const float*>(a.f32()));
}

// Quantizes a [rows, K] into q (tiles along K, or 128 x 128 blocks).
void quantize_into(const char* op, const Tensor& a, Fp8Operand& q) {
  auto* codes = static_cast<uint8_t*>(q.codes.t.data());
  with_values(op, a, [&](const auto* v) {
    if (q.blocks)
      lowp::quantize_blocks(v, a.dim(0), a.dim(1), codes, q.scales.f32());
    else
      lowp::quantize_tiles(v, a.dim(0), a.dim(1), codes, q.scales.f32());
  });
}

// fp8_quantize of a's transpose [cols, rows] into q, bit for bit, without an f32 transpose: tiles
// along a's rows (`work`: lowp::tiles_transposed_work_bytes), or a's own 128 x 128 blocks written
// transposed.
void quantize_transposed_into(const char* op, const Tensor& a, Fp8Operand& q, uint8_t* work) {
  auto* codes = static_cast<uint8_t*>(q.codes.t.data());
  with_values(op, a, [&](const auto* v) {
    if (q.blocks)
      lowp::quantize_blocks_transposed(v, a.dim(0), a.dim(1), codes, q.scales.f32());
    else
      lowp::quantize_tiles_transposed(v, a.dim(0), a.dim(1), codes, q.scales.f32(), work);
  });
}

}  // namespace

Fp8Operand fp8_quantize(const Tensor& a, bool blocks) {
  const char* op = "fp8_quantize";
  check_2d(op, a);
  const int64_t rows = a.dim(0), k = a.dim(1);
  Fp8Operand q;
  q.blocks = blocks;
  q.codes = OwnedTensor(DType::F8E4M3, {rows, k}, a.name() + ".e4m3", Device::Host, Fill::Uninitialized);
  q.scales = OwnedTensor(DType::F32, scale_shape(rows, k, blocks), a.name() + ".scale", Device::Host,
                         Fill::Uninitialized);
  quantize_into(op, a, q);
  return q;
}

void fp8_dequantize(const Fp8Operand& q, const Tensor& out) {
  const char* op = "fp8_dequantize";
  host::check_f32_host(op, out);
  expect_shape(op, out, {q.rows(), q.k()});
  const auto* codes = static_cast<const uint8_t*>(q.codes.t.data());
  if (q.blocks)
    lowp::dequantize_blocks(codes, q.scales.f32(), q.rows(), q.k(), out.f32());
  else
    lowp::dequantize_tiles(codes, q.scales.f32(), q.rows(), q.k(), out.f32());
}

void fp8_gemm(const Fp8Operand& a, const Fp8Operand& b, const Tensor& c, bool accumulate) {
  DSV3_PROFILE(Gemm);
  const char* op = "fp8_gemm";
  DSV3_CHECK(!a.blocks, op, ": the left operand '", a.codes.t.name(), "' must have 1 x 128 tile scales");
  const int64_t M = a.rows(), N = b.rows(), K = a.k();
  DSV3_CHECK(b.k() == K, op, ": operands '", a.codes.t.name(), "' ", a.codes.t.shape_str(), " and '",
             b.codes.t.name(), "' ", b.codes.t.shape_str(), " differ in K");
  host::check_f32_host(op, c);
  expect_shape(op, c, {M, N});
  if (M == 0 || N == 0) return;
  // The E4M3 values, unscaled, as f32 (exact).
  const float* tab = lowp::e4m3_table();
  // The decoded operands, the accumulator and a chunk's partials, in the scratch buffer.
  float* av = gemm_scratch(M * K + N * K + 2 * M * N);
  float* bv = av + M * K;
  float* acc = bv + N * K;
  float* part = acc + M * N;
  const auto* ac = static_cast<const uint8_t*>(a.codes.t.data());
  const auto* bc = static_cast<const uint8_t*>(b.codes.t.data());
  for (int64_t i = 0; i < M * K; ++i) av[i] = tab[ac[i]];
  for (int64_t i = 0; i < N * K; ++i) bv[i] = tab[bc[i]];
  std::fill(acc, acc + M * N, 0.0f);
  const int64_t KT = lowp::tiles(K);
  const float* sa = a.scales.f32();
  const float* sb = b.scales.f32();
  for (int64_t kt = 0; kt < KT; ++kt) {
    const int64_t k0 = kt * lowp::kFp8Tile, kw = std::min(lowp::kFp8Tile, K - k0);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N),
                static_cast<int>(kw), 1.0f, av + k0, static_cast<int>(K), bv + k0, static_cast<int>(K), 0.0f,
                part, static_cast<int>(N));
    for (int64_t m = 0; m < M; ++m) {
      const float s_a = sa[m * KT + kt];
      float* am = acc + m * N;
      const float* pm = part + m * N;
      if (b.blocks) {  // one scale per 128 columns
        for (int64_t n0 = 0; n0 < N; n0 += lowp::kFp8Tile) {
          const float s_b = sb[(n0 / lowp::kFp8Tile) * KT + kt];
          const int64_t n1 = std::min(N, n0 + lowp::kFp8Tile);
          for (int64_t n = n0; n < n1; ++n) am[n] += pm[n] * s_a * s_b;
        }
      } else {
        for (int64_t n = 0; n < N; ++n) am[n] += pm[n] * s_a * sb[n * KT + kt];
      }
    }
  }
  float* out = c.f32();
  if (accumulate)
    for (int64_t i = 0; i < M * N; ++i) out[i] += acc[i];
  else
    std::copy(acc, acc + M * N, out);
}

void fp8_linear_forward(const Tensor& x, const Tensor& w, const Tensor& y, bool accumulate) {
  const char* op = "fp8_linear_forward";
  for (const Tensor* t : {&x, &w, &y}) check_2d(op, *t);
  const int64_t M = x.dim(0), K = x.dim(1), N = w.dim(0);
  expect_shape(op, w, {N, K});
  expect_shape(op, y, {M, N});
  OperandArena arena(operand_bytes(M, K, false) + operand_bytes(N, K, true), op);
  Fp8Operand xq = arena.operand(M, K, false, x.name()), wq = arena.operand(N, K, true, w.name());
  quantize_into(op, x, xq);
  quantize_into(op, w, wq);
  fp8_gemm(xq, wq, y, accumulate);
}

void fp8_linear_forward(const Fp8Operand& xq, const Tensor& w, const Tensor& y, bool accumulate) {
  const char* op = "fp8_linear_forward";
  DSV3_CHECK(!xq.blocks, op, ": the activation '", xq.codes.t.name(), "' must have 1 x 128 tile scales");
  for (const Tensor* t : {&w, &y}) check_2d(op, *t);
  const int64_t M = xq.rows(), K = xq.k(), N = w.dim(0);
  expect_shape(op, w, {N, K});
  expect_shape(op, y, {M, N});
  OperandArena arena(operand_bytes(N, K, true), op);
  Fp8Operand wq = arena.operand(N, K, true, w.name());
  quantize_into(op, w, wq);
  fp8_gemm(xq, wq, y, accumulate);
}

void fp8_linear_backward_input(const Tensor& dy, const Tensor& w, const Tensor& dx, bool accumulate) {
  const char* op = "fp8_linear_backward_input";
  for (const Tensor* t : {&dy, &w, &dx}) check_2d(op, *t);
  const int64_t M = dy.dim(0), N = dy.dim(1), K = w.dim(1);
  expect_shape(op, w, {N, K});
  expect_shape(op, dx, {M, K});
  // w^T [K, N]: its 128 x 128 blocks are w's blocks transposed (same scales, same codes).
  OperandArena arena(operand_bytes(M, N, false) + operand_bytes(K, N, true), op);
  Fp8Operand dyq = arena.operand(M, N, false, dy.name()), wt = arena.operand(K, N, true, w.name() + "^T");
  quantize_into(op, dy, dyq);
  quantize_transposed_into(op, w, wt, nullptr);
  fp8_gemm(dyq, wt, dx, accumulate);
}

void fp8_linear_backward_weight(const Tensor& dy, const Tensor& x, const Tensor& dw) {
  const char* op = "fp8_linear_backward_weight";
  for (const Tensor* t : {&dy, &x, &dw}) check_2d(op, *t);
  const int64_t M = dy.dim(0), N = dy.dim(1), K = x.dim(1);
  expect_shape(op, x, {M, K});
  expect_shape(op, dw, {N, K});
  // Reduction over the M tokens: dy^T [N, M] and x^T [K, M], both tiled along M.
  const int64_t work = lowp::tiles_transposed_work_bytes(M, std::max(N, K));
  OperandArena arena(operand_bytes(N, M, false) + operand_bytes(K, M, false) + align64(work), op);
  Fp8Operand dyt = arena.operand(N, M, false, dy.name() + "^T"),
             xt = arena.operand(K, M, false, x.name() + "^T");
  uint8_t* w = arena.take(work);
  quantize_transposed_into(op, dy, dyt, w);
  quantize_transposed_into(op, x, xt, w);
  fp8_gemm(dyt, xt, dw, /*accumulate=*/true);
}

}  // namespace dsv3::ops
