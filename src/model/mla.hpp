// Multi-head Latent Attention (MODEL.md, "MLA"): low-rank query (optional) and key/value latents,
// decoupled RoPE on a shared key head, causal flash-style attention, output projection.
#pragma once

#include "model/common.hpp"
#include "model/params.hpp"

namespace dsv3 {

class MLA {
 public:
  // prefix = model.layers.{l}.self_attn. Under tensor parallelism this rank holds heads
  // [tp_rank * H / tp, (tp_rank + 1) * H / tp): q_b (or q_proj) and kv_b split by output rows, o_proj by
  // input columns; the down-projections and their norms are replicated.
  MLA(const ModelConfig& m, ParamStore& ps, const std::string& prefix, const ModelParallel& mp = {});
  struct Saved {
    Tensor xn;                      // [T, d] normed block input (owned by the block)
    OwnedTensor qa, qa_n, qa_rstd;  // [T, r_q], [T, r_q], [T]   (q_lora only)
    OwnedTensor kva;                // [T, r_kv + R]
    OwnedTensor c, c_n, c_rstd;     // [T, r_kv], [T, r_kv], [T]
    OwnedTensor q;                  // [B, S, H, n + R] after RoPE (H: local heads)
    OwnedTensor k, v;               // [B, S, H, n + R], [B, S, H, dv]
    OwnedTensor o, lse;             // [B, S, H, dv], [B, H, S]
    // use_fp8_kv: the normed latent c_n in FP8 (1 x 128 tiles; the codes the forward's kv_b_proj
    // used), stored instead of c, c_n, k and v (kva, with c and the rotary key's columns, is kept).
    ops::Fp8Operand kv_fp8;
  };
  // y += o_proj(attention(xn)); xn has all T rows, y the stream rows (ModelParallel::stream_rows).
  void forward(const ParamStore& ps, const Tensor& xn, const Tensor& y, Saved& s,
               const StepContext& ctx) const;
  // dxn [T, d] overwritten from dy [T, d] (all rows; dxn is the same on every TP rank); weight
  // gradients accumulate.
  void backward(const ParamStore& ps, const Saved& s, const Tensor& dy, const Tensor& dxn,
                const StepContext& ctx) const;
  // Selective recompute: frees the latent norm outputs (module norms) and the per-head q, k, v
  // (module mla_up_proj); recompute() rebuilds whatever of them is missing, from the saved latents.
  static void drop_recomputable(Saved& s, const RecomputeSet& r);
  void recompute(const ParamStore& ps, Saved& s, const StepContext& ctx) const;
  // Mixed precision, after the forward: the saved activations go to bf16 storage, and under
  // use_fp8_kv the normed KV latent to FP8 (the latent's copy, its norm and the keys and values
  // derived from it are dropped). restore() brings them back to f32 before the backward, rebuilding
  // the latent from kva and the keys and values from the FP8 codes.
  static void store(Saved& s, const StepContext& ctx);
  void restore(const ParamStore& ps, Saved& s, const StepContext& ctx) const;
  // The forward of a full recompute under use_fp8_kv, which is not stored: the normed latent takes,
  // in place, the values restore() would rebuild from the FP8 codes (the keys and values already came
  // from them), and the codes are dropped.
  static void apply_fp8_kv(Saved& s, const StepContext& ctx);

 private:
  // The per-head queries after RoPE, from the q latent's norm (or from xn without q_lora_rank).
  void queries(const ParamStore& ps, Saved& s, const StepContext& ctx) const;
  // k_pe from the kva columns, rotated; the per-head keys and values from the normed latent c_n.
  void keys_values(const ParamStore& ps, Saved& s, const StepContext& ctx) const;
  ModelParallel mp_;
  int64_t d_, H_, n_, R_, dv_, rq_, rkv_;  // H_: heads on this rank
  float eps_;
  size_t q_ = 0, q_a_ = 0, q_a_norm_ = 0, q_b_ = 0, kv_a_, kv_norm_, kv_b_, o_;
};

}  // namespace dsv3
