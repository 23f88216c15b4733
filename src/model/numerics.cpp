// Mixed-precision helpers of common.hpp: the run's numerics from the config, activation rounding,
// linear layers in bf16 or FP8, saved activations stored in bf16.
#include <algorithm>

#include "core/error.hpp"
#include "core/lowp.hpp"
#include "model/common.hpp"

namespace dsv3 {

Numerics numerics_of(const Config& c) {
  Numerics n;
  n.bf16 = c.training.precision == "bf16";
  n.fp8 = c.training.use_fp8;
  // Under use_fp8, whether an FP8 list (passes or modules) names `x`; an empty list names all.
  const auto in = [&](const std::vector<std::string>& list, const char* x) {
    return n.fp8 && (list.empty() || std::find(list.begin(), list.end(), x) != list.end());
  };
  const auto& passes = c.training.fp8_passes;
  n.fp8_fprop = in(passes, "fprop"), n.fp8_dgrad = in(passes, "dgrad"), n.fp8_wgrad = in(passes, "wgrad");
  n.fp8_attention = in(c.training.fp8_modules, "attention"), n.fp8_ffn = in(c.training.fp8_modules, "ffn");
  const auto& operands = c.training.fp8_operands;
  n.fp8_activations = in(operands, "activations"), n.fp8_weights = in(operands, "weights");
  n.fp8_gradients = in(operands, "gradients");
  n.fp8_stochastic = n.fp8 && c.training.fp8_rounding == "stochastic";
  n.fp8_kv = c.model.mla.use_fp8_kv;
  n.fp8_dispatch = c.model.moe.deep_ep_fp8;
  // load_config refuses FP8 parts without bf16 (config.cpp).
  return n;
}

void round_act(const StepContext& ctx, const Tensor& t) {
  if (!ctx.num.bf16 || t.numel() == 0) return;
  lowp::round_bf16(t.f32(), t.numel());
}

namespace {
// Whether pass `on` of a projection of kind k is an FP8 GEMM.
bool fp8_gemm(const Numerics& n, GemmKind k, bool on) {
  return on && ((k == GemmKind::Fp8Attention && n.fp8_attention) || (k == GemmKind::Fp8Ffn && n.fp8_ffn));
}

// Whether an FP8 GEMM is the FP8 kernels' (all operands quantized, rounded to nearest); otherwise
// the ablation path (training.fp8_operands, training.fp8_rounding).
bool all_operands(const Numerics& n) {
  return n.fp8_activations && n.fp8_weights && n.fp8_gradients && !n.fp8_stochastic;
}

// The values an FP8 GEMM takes for operand a [rows, K], as f32: its E4M3 codes times their scales,
// with 1 x 128 tiles along K (or 128 x 128 blocks); under stochastic rounding, drawn with a key
// hashed from a's values (so a recomputed operand is rounded as it was the first time).
OwnedTensor fp8_values(const Numerics& n, const Tensor& a, bool blocks) {
  OwnedTensor v = act_out({a.dim(0), a.dim(1)}, a.name() + ".fp8");
  if (!n.fp8_stochastic) {
    ops::fp8_dequantize(ops::fp8_quantize(a, blocks), v);
    return v;
  }
  float* d = v.f32();
  if (a.dtype() == DType::BF16)
    lowp::from_bf16(static_cast<const uint16_t*>(a.data()), d, a.numel());
  else
    std::copy(a.f32(), a.f32() + a.numel(), d);
  uint64_t key = 0xcbf29ce484222325ull ^ static_cast<uint64_t>(blocks);  // FNV-1a over the bits
  for (int64_t i = 0; i < a.numel(); ++i) key = (key ^ lowp::bits_of(d[i])) * 0x100000001b3ull;
  lowp::fp8_round_stochastic(d, a.dim(0), a.dim(1), blocks, key);
  return v;
}

// a^T as a fresh f32 tensor (a f32).
OwnedTensor transposed(const Tensor& a) {
  DSV3_CHECK(a.dtype() == DType::F32, "transposed: '", a.name(), "' must be f32");
  const int64_t r = a.dim(0), c = a.dim(1);
  OwnedTensor t = act_out({c, r}, a.name() + "^T");
  const float* s = a.f32();
  float* d = t.f32();
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) d[j * r + i] = s[i * c + j];
  return t;
}

// The operand ablation (training.fp8_operands without all three): each listed operand replaced by
// its FP8 values, then an fp32 GEMM; the unlisted one as it is (bf16 values in a bf16 run).
void ablated_fwd(const Numerics& n, const Tensor& x, const Tensor& w, const Tensor& y, bool accumulate) {
  OwnedTensor xv, wv;
  if (n.fp8_activations) xv = fp8_values(n, x, false);
  if (n.fp8_weights) wv = fp8_values(n, w, true);
  ops::linear_forward(n.fp8_activations ? xv.t : x, n.fp8_weights ? wv.t : w, y, accumulate);
}
}  // namespace

void linear_fwd(const StepContext& ctx, GemmKind k, const Tensor& x, const Tensor& w, const Tensor& y,
                bool accumulate) {
  if (!fp8_gemm(ctx.num, k, ctx.num.fp8_fprop))
    ops::linear_forward(x, w, y, accumulate);
  else if (all_operands(ctx.num))
    ops::fp8_linear_forward(x, w, y, accumulate);
  else
    ablated_fwd(ctx.num, x, w, y, accumulate);
  round_act(ctx, y);
}

void linear_fwd(const StepContext& ctx, GemmKind k, const ops::Fp8Operand& xq, const Tensor& w,
                const Tensor& y) {
  if (fp8_gemm(ctx.num, k, ctx.num.fp8_fprop) && all_operands(ctx.num)) {
    ops::fp8_linear_forward(xq, w, y);
  } else if (fp8_gemm(ctx.num, k, ctx.num.fp8_fprop)) {
    // The cached codes are already the activation operand (load_config refuses the cache without
    // activations in training.fp8_operands).
    OwnedTensor x = act_out({xq.rows(), xq.k()}, xq.codes.t.name() + ".values");
    ops::fp8_dequantize(xq, x);
    OwnedTensor wv;
    if (ctx.num.fp8_weights) wv = fp8_values(ctx.num, w, true);
    ops::linear_forward(x, ctx.num.fp8_weights ? wv.t : w, y);
  } else {
    OwnedTensor x = act_out({xq.rows(), xq.k()}, xq.codes.t.name() + ".values");
    ops::fp8_dequantize(xq, x);
    round_act(ctx, x);
    ops::linear_forward(x, w, y);
  }
  round_act(ctx, y);
}

void linear_dgrad(const StepContext& ctx, GemmKind k, const Tensor& dy, const Tensor& w, const Tensor& dx,
                  bool accumulate) {
  const Numerics& n = ctx.num;
  if (!fp8_gemm(n, k, n.fp8_dgrad)) {
    ops::linear_backward_input(dy, w, dx, accumulate);
  } else if (all_operands(n)) {
    ops::fp8_linear_backward_input(dy, w, dx, accumulate);
  } else {  // dy tiled along N, w in blocks (w^T has the same blocks)
    OwnedTensor dyv, wv;
    if (n.fp8_gradients) dyv = fp8_values(n, dy, false);
    if (n.fp8_weights) wv = fp8_values(n, w, true);
    ops::linear_backward_input(n.fp8_gradients ? dyv.t : dy, n.fp8_weights ? wv.t : w, dx, accumulate);
  }
  round_act(ctx, dx);
}

void linear_wgrad(const StepContext& ctx, GemmKind k, const Tensor& dy, const Tensor& x, const Tensor& dw) {
  const Numerics& n = ctx.num;
  if (!fp8_gemm(n, k, n.fp8_wgrad)) {
    ops::linear_backward_weight(dy, x, dw);
  } else if (all_operands(n)) {
    ops::fp8_linear_backward_weight(dy, x, dw);
  } else {  // the reduction runs over the tokens: dy^T [N, M] and x^T [K, M], tiled along M
    OwnedTensor dyt = transposed(dy), xt = transposed(x);
    if (n.fp8_gradients) dyt = fp8_values(n, dyt, false);
    if (n.fp8_activations) xt = fp8_values(n, xt, false);
    ops::linear_forward(dyt, xt, dw, /*accumulate=*/true);  // dw += dy^T x
  }
}

void store_bf16(OwnedTensor& t) {
  if (t.t.empty() || t.t.dtype() != DType::F32) return;
  OwnedTensor h(DType::BF16, t.t.shape(), t.t.name(), Device::Host, Fill::Uninitialized);
  lowp::to_bf16(t.f32(), static_cast<uint16_t*>(h.t.data()), t.t.numel());
  t = std::move(h);
}

void load_f32(OwnedTensor& t) {
  if (t.t.empty() || t.t.dtype() != DType::BF16) return;
  OwnedTensor f(DType::F32, t.t.shape(), t.t.name(), Device::Host, Fill::Uninitialized);
  lowp::from_bf16(static_cast<const uint16_t*>(t.t.data()), f.f32(), t.t.numel());
  t = std::move(f);
}

}  // namespace dsv3
