// CUDA twin of kernels/host/attention.cpp: causal attention with an online softmax, O(S) memory
// (semantics in kernels/ops.hpp). This first version is the fp32 reference on the GPU, one warp per
// row, no shared-memory tiling and no tensor cores: the forward walks keys 0..s for query s; the
// backward recomputes probabilities from lse, once per query row for dq and once per key row for dk
// and dv, so no gradient is summed with atomics and results are deterministic. The flash kernel on
// tensor cores (bf16 mma) replaces it for speed and is checked against it.
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_ops.hpp"

namespace dsv3::cuda {

namespace {

constexpr int kWarps = 4;       // rows per block
constexpr int kMaxPerLane = 8;  // head dims up to 256
constexpr int kMaxDim = 32 * kMaxPerLane;

__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Geo {
  int64_t B, S, H, Dqk, Dv;
  __device__ int64_t row_qk(int64_t b, int64_t s, int64_t h) const { return ((b * S + s) * H + h) * Dqk; }
  __device__ int64_t row_v(int64_t b, int64_t s, int64_t h) const { return ((b * S + s) * H + h) * Dv; }
};

// The lane's share of a row: elements lane, lane + 32, ...
__device__ inline void load_row(const float* p, int64_t n, float* r) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t j = lane + 32 * i;
    r[i] = j < n ? p[j] : 0.0f;
  }
}

__device__ inline float dot_row(const float* r, const float* p, int64_t n) {
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t j = lane + 32 * i;
    if (j < n) acc += r[i] * p[j];
  }
  return warp_sum(acc);
}

// One warp per (b, h, s) query row.
__global__ void attn_fwd_kernel(const float* q, const float* k, const float* v, float scale, float* o,
                                float* lse, Geo g) {
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= g.B * g.H * g.S) return;
  const int64_t s = row % g.S, bh = row / g.S, h = bh % g.H, b = bh / g.H;
  float qr[kMaxPerLane], acc[kMaxPerLane];
  load_row(q + g.row_qk(b, s, h), g.Dqk, qr);
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  const int lane = threadIdx.x & 31;
  for (int64_t j = 0; j <= s; ++j) {
    const float x = scale * dot_row(qr, k + g.row_qk(b, j, h), g.Dqk);
    const float m2 = fmaxf(m, x);
    const float c = expf(m - m2), p = expf(x - m2);
    l = l * c + p;
    const float* vr = v + g.row_v(b, j, h);
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      acc[i] = acc[i] * c + (d < g.Dv ? p * vr[d] : 0.0f);
    }
    m = m2;
  }
  float* orow = o + g.row_v(b, s, h);
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < g.Dv) orow[d] = acc[i] / l;
  }
  if (lane == 0) lse[bh * g.S + s] = m + logf(l);
}

// Dsum[b, h, s] = <d_o[s], o[s]>
__global__ void attn_dsum_kernel(const float* o, const float* d_o, float* dsum, Geo g) {
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= g.B * g.H * g.S) return;
  const int64_t s = row % g.S, bh = row / g.S, h = bh % g.H, b = bh / g.H;
  float r[kMaxPerLane];
  load_row(d_o + g.row_v(b, s, h), g.Dv, r);
  const float d = dot_row(r, o + g.row_v(b, s, h), g.Dv);
  if ((threadIdx.x & 31) == 0) dsum[row] = d;
}

// dq[s] = scale * sum_{j <= s} p_sj (dp_sj - D_s) k_j, dp_sj = <d_o[s], v_j>; one warp per query row.
__global__ void attn_dq_kernel(const float* q, const float* k, const float* v, const float* lse,
                               const float* d_o, const float* dsum, float scale, float* dq, Geo g) {
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= g.B * g.H * g.S) return;
  const int64_t s = row % g.S, bh = row / g.S, h = bh % g.H, b = bh / g.H;
  float qr[kMaxPerLane], dor[kMaxPerLane], acc[kMaxPerLane];
  load_row(q + g.row_qk(b, s, h), g.Dqk, qr);
  load_row(d_o + g.row_v(b, s, h), g.Dv, dor);
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) acc[i] = 0.0f;
  const float z = lse[row], D = dsum[row];
  const int lane = threadIdx.x & 31;
  for (int64_t j = 0; j <= s; ++j) {
    const float* kr = k + g.row_qk(b, j, h);
    const float p = expf(scale * dot_row(qr, kr, g.Dqk) - z);
    const float ds = p * (dot_row(dor, v + g.row_v(b, j, h), g.Dv) - D);
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < g.Dqk) acc[i] += ds * kr[d];
    }
  }
  float* out = dq + g.row_qk(b, s, h);
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < g.Dqk) out[d] = scale * acc[i];
  }
}

// dk[j] = scale * sum_{s >= j} ds_sj q_s, dv[j] = sum_{s >= j} p_sj d_o[s]; one warp per key row.
__global__ void attn_dkv_kernel(const float* q, const float* k, const float* v, const float* lse,
                                const float* d_o, const float* dsum, float scale, float* dk, float* dv,
                                Geo g) {
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= g.B * g.H * g.S) return;
  const int64_t j = row % g.S, bh = row / g.S, h = bh % g.H, b = bh / g.H;
  float kr[kMaxPerLane], vr[kMaxPerLane], ak[kMaxPerLane], av[kMaxPerLane];
  load_row(k + g.row_qk(b, j, h), g.Dqk, kr);
  load_row(v + g.row_v(b, j, h), g.Dv, vr);
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) ak[i] = av[i] = 0.0f;
  const int lane = threadIdx.x & 31;
  for (int64_t s = j; s < g.S; ++s) {
    const float* qs = q + g.row_qk(b, s, h);
    const float* dos = d_o + g.row_v(b, s, h);
    const float p = expf(scale * dot_row(kr, qs, g.Dqk) - lse[bh * g.S + s]);
    const float ds = p * (dot_row(vr, dos, g.Dv) - dsum[bh * g.S + s]);
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < g.Dqk) ak[i] += ds * qs[d];
      if (d < g.Dv) av[i] += p * dos[d];
    }
  }
  float* ok = dk + g.row_qk(b, j, h);
  float* ov = dv + g.row_v(b, j, h);
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < g.Dqk) ok[d] = scale * ak[i];
    if (d < g.Dv) ov[d] = av[i];
  }
}

Geo geometry(const char* op, const Tensor& q, const Tensor& v) {
  Geo g{q.dim(0), q.dim(1), q.dim(2), q.dim(3), v.dim(3)};
  DSV3_CHECK(g.Dqk <= kMaxDim && g.Dv <= kMaxDim, op, ": head dims up to ", kMaxDim,
             " on the GPU, got tensors '", q.name(), "' ", q.shape_str(), " and '", v.name(), "' ",
             v.shape_str());
  return g;
}

unsigned row_blocks(const Geo& g) { return static_cast<unsigned>((g.B * g.H * g.S + kWarps - 1) / kWarps); }

}  // namespace

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& o,
                       const Tensor& lse) {
  const char* op = "attention_forward";
  for (const Tensor* t : {&q, &k, &v, &o, &lse}) check_on_device(op, *t, DType::F32);
  const Geo g = geometry(op, q, v);
  if (g.B * g.H * g.S == 0) return;
  attn_fwd_kernel<<<row_blocks(g), 32 * kWarps, 0, stream()>>>(q.f32(), k.f32(), v.f32(), scale, o.f32(),
                                                               lse.f32(), g);
  check_launch(op);
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                        const Tensor& d_o, float scale, const Tensor& dq, const Tensor& dk,
                        const Tensor& dv) {
  const char* op = "attention_backward";
  for (const Tensor* t : {&q, &k, &v, &o, &lse, &d_o, &dq, &dk, &dv}) check_on_device(op, *t, DType::F32);
  const Geo g = geometry(op, q, v);
  if (g.B * g.H * g.S == 0) return;
  OwnedTensor dsum(DType::F32, {g.B, g.H, g.S}, "attention_dsum", Device::Cuda, Fill::Uninitialized);
  attn_dsum_kernel<<<row_blocks(g), 32 * kWarps, 0, stream()>>>(o.f32(), d_o.f32(), dsum.f32(), g);
  check_launch(op);
  attn_dq_kernel<<<row_blocks(g), 32 * kWarps, 0, stream()>>>(q.f32(), k.f32(), v.f32(), lse.f32(), d_o.f32(),
                                                              dsum.f32(), scale, dq.f32(), g);
  check_launch(op);
  attn_dkv_kernel<<<row_blocks(g), 32 * kWarps, 0, stream()>>>(
      q.f32(), k.f32(), v.f32(), lse.f32(), d_o.f32(), dsum.f32(), scale, dk.f32(), dv.f32(), g);
  check_launch(op);
}

}  // namespace dsv3::cuda
