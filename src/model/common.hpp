// Things every layer of the model shares: the shape of the micro-batch, the RoPE tables, the
// attention scale and the recompute set, passed explicitly to forward/backward.
#pragma once

#include <cstdint>
#include <string>

#include "config/config.hpp"
#include "core/tensor.hpp"
#include "model/parallel.hpp"
#include "ops.hpp"

namespace dsv3 {

// The numerics of a run (MODEL.md, "Mixed precision"). fp32: everything f32. bf16: compute weights
// and activations (and activation gradients) rounded to bf16 where the GPU would store them in bf16,
// saved activations stored in bf16, GEMMs on bf16 operands with fp32 accumulation; norm statistics,
// softmax/attention statistics, the router, the losses, weight gradients and the optimizer in fp32.
// fp8 (on top of bf16): the attention and FFN/expert projections run as FP8 GEMMs (ops::fp8_linear_*).
// fp8_kv: MLA keeps its KV latent for backward in FP8 with 1 x 128 tile scales and rebuilds the keys
// and values from it. fp8_dispatch: routed-expert inputs travel (and are kept) as FP8 rows + scales.
// fp8_fprop / fp8_dgrad / fp8_wgrad: which passes of those projections are FP8 (training.fp8_passes;
// all three under use_fp8 by default), the others bf16. fp8_attention / fp8_ffn: which projections
// (training.fp8_modules: the MLA projections, the dense FFN and experts; both by default).
// fp8_activations / fp8_weights / fp8_gradients: which operands those GEMMs quantize
// (training.fp8_operands; all three by default); with one left out they run as fp32 GEMMs of the
// operands' FP8 values and the other operand's own values (an ablation, not a GPU kernel).
// fp8_stochastic: those values rounded stochastically (training.fp8_rounding), on the same path.
struct Numerics {
  bool bf16 = false, fp8 = false, fp8_kv = false, fp8_dispatch = false;
  bool fp8_fprop = false, fp8_dgrad = false, fp8_wgrad = false;
  bool fp8_attention = false, fp8_ffn = false;
  bool fp8_activations = false, fp8_weights = false, fp8_gradients = false;
  bool fp8_stochastic = false;  // training.fp8_rounding: stochastic (the ablation path too)
};
// From training.precision, training.use_fp8, model.mla.use_fp8_kv and model.moe.deep_ep_fp8; a
// combination without an implementation throws naming the key.
Numerics numerics_of(const Config& c);

struct StepContext {
  int64_t B = 0, S = 0;  // sequences and tokens per sequence; T = B * S token rows (the residual
                         // stream has ModelParallel::stream_rows(T) of them on this rank)
  int64_t T() const { return B * S; }
  Tensor rope_cos, rope_sin;  // [S, R/2]
  float attn_scale = 1.0f;
  RecomputeSet recompute;   // what the backward rebuilds (config/config.hpp)
  bool training = true;     // false: forward only, nothing saved for backward
  float grad_scale = 1.0f;  // multiplies every loss term's gradient (gradient accumulation)
  Numerics num;
  // Mixed precision: saved activations go to their storage formats after a block's forward. The
  // re-run forward of full recompute, right before the backward, skips the lossless bf16 round trip
  // (the FP8 caches still apply, so every recompute mode computes the same bits).
  bool store_saved = true;
};

ops::RopeParams rope_params(const ModelConfig& m);
// (n + R)^-0.5, times mscale^2 under YaRN (MODEL.md, MLA).
float attention_scale(const ModelConfig& m);

// A fresh zero-filled f32 activation.
inline OwnedTensor act(std::vector<int64_t> shape, const std::string& name) {
  return OwnedTensor(DType::F32, std::move(shape), name);
}
// A fresh f32 activation with undefined contents, for outputs the next op overwrites completely
// (never for accumulating outputs).
inline OwnedTensor act_out(std::vector<int64_t> shape, const std::string& name) {
  return OwnedTensor(DType::F32, std::move(shape), name, Device::Host, Fill::Uninitialized);
}

// Rounds t to bf16 in place when the run is bf16 (an activation or activation gradient the GPU
// stores in bf16); nothing in fp32.
void round_act(const StepContext& ctx, const Tensor& t);

// The GEMMs of a linear layer in the run's precision. Fp8Attention and Fp8Ffn mark the projections
// DeepSeek-V3 runs in FP8 (report section 3.3.1: the MLA projections; the dense FFN and the shared and
// routed experts): FP8 GEMMs under training.use_fp8 when training.fp8_modules lists them, bf16
// otherwise. Outputs (y, dx) are rounded like activations; weight gradients accumulate in fp32.
enum class GemmKind { Bf16, Fp8Attention, Fp8Ffn };
void linear_fwd(const StepContext& ctx, GemmKind k, const Tensor& x, const Tensor& w, const Tensor& y,
                bool accumulate = false);
// The forward from an input kept as E4M3 codes with 1 x 128 tiles along K (the FP8 KV cache): an
// FP8 Fprop uses the codes as they are (the same bits as linear_fwd of the input they were quantized
// from); otherwise the GEMM takes their values, rounded to bf16 in a bf16 run.
void linear_fwd(const StepContext& ctx, GemmKind k, const ops::Fp8Operand& xq, const Tensor& w,
                const Tensor& y);
void linear_dgrad(const StepContext& ctx, GemmKind k, const Tensor& dy, const Tensor& w, const Tensor& dx,
                  bool accumulate = false);
void linear_wgrad(const StepContext& ctx, GemmKind k, const Tensor& dy, const Tensor& x, const Tensor& dw);

// Saved activations in their storage precision: an f32 tensor becomes bf16 (its values already are
// bf16 under round_act, so nothing is lost), and back to f32 before the backward reads it. Empty
// tensors and tensors already in the target dtype are left alone.
void store_bf16(OwnedTensor& t);
void load_f32(OwnedTensor& t);

// Sums t over the tensor-parallel group in place (nothing without TP).
void tp_allreduce(const ModelParallel& mp, const Tensor& t);

// The edges of a tensor-parallel region (Megatron's f/g operators), sequence-parallel aware. Inside a
// region tensors have all T rows; outside, the residual stream has stream_rows(T) rows.
// Entry (forward) and exit gradient (backward): the stream rows -> all rows. Under sequence
// parallelism an all-gather into `holder`; otherwise `local` itself (holder untouched).
Tensor tp_gather_rows(const ModelParallel& mp, const Tensor& local, OwnedTensor& holder, const char* name);
// Exit (forward) and entry gradient (backward): y (= or +=) the sum over the TP group of `part` [T, d],
// restricted to this rank's stream rows: reduce-scatter under sequence parallelism, all-reduce
// otherwise. `part` is clobbered.
void tp_reduce_rows(const ModelParallel& mp, const Tensor& part, const Tensor& y, bool accumulate);
// A full gradient that every TP rank holds identically [T, d] -> this rank's stream rows of it.
void tp_slice_rows(const ModelParallel& mp, const Tensor& full, const Tensor& y, bool accumulate);
// RMSNorm backward on stream rows; under sequence parallelism the weight gradient, a partial sum over
// the TP ranks' rows, is summed over the group before it accumulates into dw.
void stream_rmsnorm_backward(const ModelParallel& mp, const Tensor& x, const Tensor& w, const Tensor& rstd,
                             const Tensor& dy, const Tensor& dx, const Tensor& dw,
                             bool accumulate_dx = false);

}  // namespace dsv3
