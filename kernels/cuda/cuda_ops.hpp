// The CUDA backend's entry points, in plain C++ (no CUDA types), so that the device-neutral op
// functions of kernels/ops.hpp can hand a device tensor to its CUDA twin. Each function here has the
// semantics of the op of the same name in ops.hpp; the caller has checked shapes and dtypes, and
// these check that every tensor is on the GPU. kernels/cuda/<op>.cu holds each, beside
// kernels/host/<op>.cpp.
#pragma once

#include <cstdint>

#include "core/tensor.hpp"

namespace dsv3::ops {
struct RouterParams;
struct DispatchPlan;
}  // namespace dsv3::ops

namespace dsv3::cuda {

// Device memory held by tensors (the caching allocator of cuda_common.cu).
struct DeviceMemoryStats {
  int64_t in_use = 0, peak_in_use = 0;      // bytes handed to tensors
  int64_t reserved = 0, peak_reserved = 0;  // bytes taken from cudaMalloc
  int64_t device_allocs = 0;                // cudaMalloc calls
};
DeviceMemoryStats memory_stats();
void reset_memory_peak();
void synchronize();  // waits for every stream of this rank

// elementwise.cu
void add_inplace(const Tensor& y, const Tensor& x);
void scale(const Tensor& y, const Tensor& x, float alpha);
void zero(const Tensor& t);
void copy_columns(const Tensor& src, int64_t col0, const Tensor& dst);
void copy_columns_backward(const Tensor& ddst, int64_t col0, const Tensor& dsrc, bool accumulate);

// linear.cu (cuBLAS, fp32 without TF32)
void linear_forward(const Tensor& x, const Tensor& w, const Tensor& y, bool accumulate);
void linear_backward_input(const Tensor& dy, const Tensor& w, const Tensor& dx, bool accumulate);
void linear_backward_weight(const Tensor& dy, const Tensor& x, const Tensor& dw);

// embedding.cu (an id outside the table throws after the kernel, naming the first bad position)
void embedding_forward(const Tensor& ids, const Tensor& table, int64_t first, int64_t vocab,
                       const Tensor& out, bool shard);
void embedding_backward(const Tensor& ids, const Tensor& dout, int64_t first, int64_t vocab,
                        const Tensor& dtable, bool shard);

// rmsnorm.cu
void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, const Tensor& y, const Tensor& rstd);
void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy,
                      const Tensor& dx, const Tensor& dw, bool accumulate_dx);

// rope.cu (the tables come from the host's rope_table, copied)
void rope_apply(const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t offset, bool inverse);

// attention.cu (fp32, one warp per row; head dims up to 256)
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& o,
                       const Tensor& lse);
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                        const Tensor& d_o, float scale, const Tensor& dq, const Tensor& dk, const Tensor& dv);

// mla_kv.cu
void mla_assemble_kv(const Tensor& kv, const Tensor& k_pe, int64_t nope, const Tensor& k, const Tensor& v);
void mla_assemble_kv_backward(const Tensor& dk, const Tensor& dv, int64_t nope, const Tensor& dkv,
                              const Tensor& dk_pe);

// swiglu.cu
void swiglu_forward(const Tensor& g, const Tensor& u, const Tensor& h);
void swiglu_backward(const Tensor& g, const Tensor& u, const Tensor& dh, const Tensor& dg, const Tensor& du);
void scale_rows_forward(const Tensor& x, const Tensor& w, const Tensor& y);
void scale_rows_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx,
                         const Tensor& dw);

// router.cu (one thread per token; up to 512 experts in up to 64 groups)
void router_forward(const ops::RouterParams& p, const Tensor& logits, const Tensor& bias,
                    const Tensor& scores, const Tensor& idx, const Tensor& weights);
void router_backward(const ops::RouterParams& p, const Tensor& logits, const Tensor& scores,
                     const Tensor& idx, const Tensor& dweights, const Tensor& dscores, const Tensor& dlogits);

// dispatch.cu (the plan's tensors live on the GPU)
ops::DispatchPlan make_dispatch_plan(const Tensor& idx, int64_t num_experts, int64_t capacity);
void dispatch_forward(const ops::DispatchPlan& plan, const Tensor& x, const Tensor& xs);
void dispatch_backward(const ops::DispatchPlan& plan, const Tensor& dxs, const Tensor& dx, bool accumulate);
void combine_forward(const ops::DispatchPlan& plan, const Tensor& ys, const Tensor& weights, const Tensor& y,
                     bool accumulate);
void combine_backward(const ops::DispatchPlan& plan, const Tensor& ys, const Tensor& weights,
                      const Tensor& dy, const Tensor& dys, const Tensor& dweights);

// balance_loss.cu
double seq_balance_loss_forward(const Tensor& scores, const Tensor& idx, int64_t batch, double alpha);
void seq_balance_loss_backward(const Tensor& scores, const Tensor& idx, int64_t batch, double alpha,
                               double dloss, const Tensor& dscores);

// cross_entropy.cu (a target outside the vocabulary throws after the kernel, naming the row)
void cross_entropy_forward(const Tensor& logits, const Tensor& targets, const Tensor& losses,
                           const Tensor& lse);
void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                            const Tensor& dloss);
void cross_entropy_shard_forward(const Tensor& logits, const Tensor& targets, int64_t first, int64_t vocab,
                                 const Tensor& shard_lse, const Tensor& target_logit);
void cross_entropy_shard_backward(const Tensor& logits, const Tensor& targets, int64_t first, int64_t vocab,
                                  const Tensor& lse, const Tensor& dloss);

}  // namespace dsv3::cuda
