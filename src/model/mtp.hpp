// Multi-token prediction module k (MODEL.md, "Losses"): h' = eh_proj([RMSNorm_e(Emb(t_{i+k})) ;
// RMSNorm_h(h^{k-1}_i)]), h^k = Block(h'); the model's shared head predicts t_{i+k+1} from
// RMSNorm(h^k; shared_head.norm). Embedding and head weights are the main model's.
#pragma once

#include "model/block.hpp"

namespace dsv3 {

class MTPModule {
 public:
  MTPModule(const ModelConfig& m, ParamStore& ps, int64_t depth_index,
            const ModelParallel& mp = {});  // depth_index k = 1..D
  struct Saved {
    Tensor h_prev;            // [T, d] h^{k-1} (owned by the model)
    Tensor e;                 // [T, d] embedding of the tokens t_{i+k} (owned by the model)
    OwnedTensor e_n, e_rstd;  // [T, d] normed embedding (freed after the forward), [T]
    OwnedTensor g_n, g_rstd;  // [T, d] normed h^{k-1} (freed after the forward), [T]
    OwnedTensor cat, hp;      // [rows, 2d] = [e_n ; g_n], [rows, d] eh_proj output
    OwnedTensor cat_all;      // sequence parallelism: cat gathered to all T rows
    Block::Saved block;
  };
  // out [T, d] = h^k from the embedding e [T, d] of t_{i+k} (the model embeds, sharing its table).
  void forward(const ParamStore& ps, const Tensor& e, const Tensor& h_prev, const Tensor& out, Saved& s,
               const StepContext& ctx) const;
  // dh_prev [T, d] += and de [T, d] (overwritten) from dout [T, d].
  void backward(const ParamStore& ps, Saved& s, const Tensor& dout, const Tensor& dh_prev, const Tensor& de,
                const StepContext& ctx) const;

  size_t head_norm() const { return head_norm_; }
  const Block& block() const { return block_; }
  int64_t layer() const { return block_.layer(); }

 private:
  int64_t d_;
  float eps_;
  ModelParallel mp_;
  size_t enorm_, hnorm_, eh_proj_, head_norm_;
  Block block_;
};

}  // namespace dsv3
