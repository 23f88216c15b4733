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
}  // namespace

void linear_fwd(const StepContext& ctx, GemmKind k, const Tensor& x, const Tensor& w, const Tensor& y,
                bool accumulate) {
  if (fp8_gemm(ctx.num, k, ctx.num.fp8_fprop))
    ops::fp8_linear_forward(x, w, y, accumulate);
  else
    ops::linear_forward(x, w, y, accumulate);
  round_act(ctx, y);
}

void linear_fwd(const StepContext& ctx, GemmKind k, const ops::Fp8Operand& xq, const Tensor& w,
                const Tensor& y) {
  if (fp8_gemm(ctx.num, k, ctx.num.fp8_fprop)) {
    ops::fp8_linear_forward(xq, w, y);
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
  if (fp8_gemm(ctx.num, k, ctx.num.fp8_dgrad))
    ops::fp8_linear_backward_input(dy, w, dx, accumulate);
  else
    ops::linear_backward_input(dy, w, dx, accumulate);
  round_act(ctx, dx);
}

void linear_wgrad(const StepContext& ctx, GemmKind k, const Tensor& dy, const Tensor& x, const Tensor& dw) {
  if (fp8_gemm(ctx.num, k, ctx.num.fp8_wgrad))
    ops::fp8_linear_backward_weight(dy, x, dw);
  else
    ops::linear_backward_weight(dy, x, dw);
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
