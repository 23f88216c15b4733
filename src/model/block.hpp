// One transformer block: h = x + MLA(RMSNorm(x)); out = h + FFN(RMSNorm(h)), FFN a dense SwiGLU
// (layers < num_dense_layers) or MoE. Saves what its backward needs, or only its input under full
// recompute (the backward then re-runs the forward).
#pragma once

#include <memory>

#include "model/mla.hpp"
#include "model/mlp.hpp"
#include "model/moe.hpp"

namespace dsv3 {

class Block {
 public:
  Block(const ModelConfig& m, ParamStore& ps, int64_t layer, bool moe, const ModelParallel& mp = {});
  struct Saved {
    Tensor x;                    // [rows, d] block input (owned by the model); rows = stream rows
    OwnedTensor xn, xn_rstd;     // [rows, d], [rows]
    OwnedTensor xn_all, hn_all;  // sequence parallelism: the normed inputs gathered to all T rows
    MLA::Saved attn;
    OwnedTensor h, hn, hn_rstd;  // [rows, d], [rows, d], [rows]
    SwiGLU::Saved mlp;
    MoE::Saved moe;
    double balance_loss = 0;
    int64_t dispatch_bytes = 0;        // sent to other EP ranks by the forward's dispatch
    std::vector<int64_t> expert_load;  // kept until backward frees the rest
    bool filled = false;
    bool trimmed = false;  // selective recompute dropped the cheap tensors
    bool stored = false;   // mixed precision: the saved tensors are in their storage formats
    void clear();          // frees everything (full recompute keeps only x)
  };
  // out = block(x), both [rows, d] (the residual-stream rows of this rank); out must not alias x.
  void forward(const ParamStore& ps, const Tensor& x, const Tensor& out, Saved& s,
               const StepContext& ctx) const;
  // dx [T, d] overwritten from dout. Re-runs the forward first when s was cleared (full recompute).
  void backward(const ParamStore& ps, Saved& s, const Tensor& dout, const Tensor& dx,
                const StepContext& ctx) const;

  bool is_moe() const { return moe_ != nullptr; }
  const MoE* moe() const { return moe_.get(); }
  int64_t layer() const { return layer_; }

 private:
  void restore_selective(const ParamStore& ps, Saved& s, const StepContext& ctx) const;
  // Saved activations to their storage formats after the forward (bf16, FP8 caches) and back.
  void store(Saved& s, const StepContext& ctx) const;
  void restore(const ParamStore& ps, Saved& s, const StepContext& ctx) const;
  int64_t layer_, d_;
  float eps_;
  ModelParallel mp_;
  size_t norm_in_, norm_post_;
  MLA attn_;
  std::unique_ptr<SwiGLU> mlp_;
  std::unique_ptr<MoE> moe_;
};

}  // namespace dsv3
