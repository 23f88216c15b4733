// The one op interface. Every op the model uses is declared here as forward/backward functions on
// Tensors; each dispatches on the tensors' device to a backend (kernels/host: Kokkos + CBLAS;
// kernels/cuda later). A naive reference of every op lives in tests/ops/reference.hpp, and the op
// registry (tests/ops) compares each backend with it and checks every backward by finite differences.
//
// Conventions
// - Tensors are contiguous row-major f32 (token ids and indices i32). Shapes are given in brackets.
// - Tokens of a micro-batch are flattened: T = B * S, row t = b * S + s.
// - Parameter gradients (dW, dw, dtable) are ACCUMULATED (+=). Input gradients are overwritten unless
//   the op says otherwise or takes `accumulate`.
// - Preconditions are checked at entry; a failure throws dsv3::Error naming the op, the tensor and
//   the shapes.
#pragma once

#include <cstdint>

#include "core/tensor.hpp"

namespace dsv3::ops {

// ---------------------------------------------------------------------------------------------
// Dense algebra
// y[M,N] (= or +=) x[M,K] . w[N,K]^T      (w in HF layout [out_features, in_features])
void linear_forward(const Tensor& x, const Tensor& w, const Tensor& y, bool accumulate = false);
// dx[M,K] (= or +=) dy[M,N] . w[N,K]
void linear_backward_input(const Tensor& dy, const Tensor& w, const Tensor& dx, bool accumulate = false);
// dw[N,K] += dy[M,N]^T . x[M,K]
void linear_backward_weight(const Tensor& dy, const Tensor& x, const Tensor& dw);

// FP8 linear layers, DeepSeek-V3's blockwise recipe (report section 3.3; formats in core/lowp.hpp).
// Every GEMM takes E4M3 operands with fp32 scales: activations and output gradients per 1 x 128 tile
// along the GEMM's reduction dimension K, weights per 128 x 128 block; for each 128-wide chunk of K
// the E4M3 values are multiplied and summed in fp32, then the chunk's partial sums, times both
// operands' scales, are added to an fp32 accumulator (promotion every 128 elements of K). Inputs may
// be f32 or bf16; outputs are f32. The host versions are the exact numerical reference, not fast.
//   Fprop:  y[M,N]  (= or +=) x[M,K] . w[N,K]^T    x tiles along K, w blocks
//   Dgrad:  dx[M,K] (= or +=) dy[M,N] . w[N,K]     dy tiles along N, w blocks (of w^T)
//   Wgrad:  dw[N,K] += dy[M,N]^T . x[M,K]          dy and x both tiles along M (128 x 1 in their layout)
void fp8_linear_forward(const Tensor& x, const Tensor& w, const Tensor& y, bool accumulate = false);
void fp8_linear_backward_input(const Tensor& dy, const Tensor& w, const Tensor& dx, bool accumulate = false);
void fp8_linear_backward_weight(const Tensor& dy, const Tensor& x, const Tensor& dw);

// An operand of an FP8 GEMM, [rows, K] with K the reduction dimension: E4M3 codes and their scales,
// [rows, tiles(K)] (1 x 128 tiles) or [tiles(rows), tiles(K)] (128 x 128 blocks).
struct Fp8Operand {
  OwnedTensor codes, scales;
  bool blocks = false;
  int64_t rows() const { return codes.t.dim(0); }
  int64_t k() const { return codes.t.dim(1); }
};
Fp8Operand fp8_quantize(const Tensor& a, bool blocks);  // a [rows, K], f32 or bf16
// out [rows, K] f32 = the operand's values (codes times their scales).
void fp8_dequantize(const Fp8Operand& q, const Tensor& out);
// c[M, N] (= or +=) a . b^T with the chunked promotion above; a must be tiled (b either).
void fp8_gemm(const Fp8Operand& a, const Fp8Operand& b, const Tensor& c, bool accumulate);
// Fprop from an activation already quantized with 1 x 128 tiles along K (xq, e.g. a cached one): bit
// for bit fp8_linear_forward(x, w, y) when xq = fp8_quantize(x, false).
void fp8_linear_forward(const Fp8Operand& xq, const Tensor& w, const Tensor& y, bool accumulate = false);

// y += x (same shape)
void add_inplace(const Tensor& y, const Tensor& x);
// y = alpha * x (same shape; y may alias x)
void scale(const Tensor& y, const Tensor& x, float alpha);
// t = 0
void zero(const Tensor& t);
// dst[T, n] = src[T, col0 : col0 + n]   (src [T, C])
void copy_columns(const Tensor& src, int64_t col0, const Tensor& dst);
// dsrc[T, col0 : col0 + n] (= or +=) ddst[T, n]; other columns of dsrc untouched
void copy_columns_backward(const Tensor& ddst, int64_t col0, const Tensor& dsrc, bool accumulate = false);

// ---------------------------------------------------------------------------------------------
// Embedding: out[T, D] = table[ids[t], :]; an id outside [0, V) throws naming the position and id.
void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out);
// dtable[ids[t], :] += dout[t, :]
void embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable);

// Vocabulary-parallel embedding (tensor parallelism): `table` [Vs, D] holds rows [first, first + Vs)
// of the full table. out[t, :] = table[ids[t] - first, :] for ids inside the shard, 0 otherwise, so
// the sum of out over the shards is the full embedding. Ids must lie in [0, vocab) (checked: an id
// outside names its position); vocab is the full vocabulary size.
void embedding_shard_forward(const Tensor& ids, const Tensor& table, int64_t first, int64_t vocab,
                             const Tensor& out);
// dtable[ids[t] - first, :] += dout[t, :] for ids inside the shard.
void embedding_shard_backward(const Tensor& ids, const Tensor& dout, int64_t first, int64_t vocab,
                              const Tensor& dtable);

// ---------------------------------------------------------------------------------------------
// RMSNorm over the last dimension: rstd[t] = 1 / sqrt(mean_j x[t,j]^2 + eps); y = x * rstd * w.
// x, y [T, D]; w [D]; rstd [T] (saved for backward).
void rmsnorm_forward(const Tensor& x, const Tensor& w, float eps, const Tensor& y, const Tensor& rstd);
// dx (= or +=), dw +=
void rmsnorm_backward(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy,
                      const Tensor& dx, const Tensor& dw, bool accumulate_dx = false);

// ---------------------------------------------------------------------------------------------
// Rotary embedding on interleaved pairs. Frequencies: f_i = theta^(-2i/R), i < R/2, blended by YaRN
// when context_length > original_context_length (DeepSeek-V3 inference/model.py semantics):
//   low = floor(R * ln(orig / (beta_fast * 2 pi)) / (2 ln theta)), high = ceil(same with beta_slow),
//   clamped to [0, R-1]; ramp_i = clamp((i - low) / (high - low), 0, 1) (high += 0.001 if equal);
//   smooth = 1 - ramp; f_i = f_i / factor * (1 - smooth) + f_i * smooth.
struct RopeParams {
  int64_t rope_dim = 0;  // R (even)
  double theta = 10000.0;
  bool yarn = false;  // context_length > original_context_length with scaling: yarn
  double factor = 1.0;
  int64_t original_context_length = 4096;
  double beta_fast = 32.0, beta_slow = 1.0;
};
// cos, sin [S, R/2] for positions 0..S-1: angle = pos * f_i (computed in double, stored f32).
void rope_table(const RopeParams& p, const Tensor& cos, const Tensor& sin);
// x [B, S, H, Dh]: for each head rotates the pairs (offset + 2i, offset + 2i + 1), i < R/2, in place:
//   (a, b) -> (a cos - b sin, a sin + b cos), position = s.
void rope_forward(const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t offset);
// In place inverse rotation of the gradient (the transpose of the forward rotation).
void rope_backward(const Tensor& dx, const Tensor& cos, const Tensor& sin, int64_t offset);

// ---------------------------------------------------------------------------------------------
// Causal attention, flash style: tiles of queries and keys with an online softmax, O(S) memory.
// q, k [B, S, H, Dqk]; v [B, S, H, Dv]; o [B, S, H, Dv]; lse [B, H, S] = log-sum-exp of the scaled
// scores of each query row (saved for backward). Query s attends to keys 0..s.
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& o,
                       const Tensor& lse);
// Recomputes probabilities tile by tile from lse; dq, dk, dv overwritten.
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse,
                        const Tensor& d_o, float scale, const Tensor& dq, const Tensor& dk, const Tensor& dv);

// MLA key/value assembly. kv [B, S, H, nope + dv] (kv_b_proj output), k_pe [B, S, R] (one rotated
// head shared by all heads) -> k [B, S, H, nope + R] = [kv[..., :nope], k_pe], v [B, S, H, dv].
void mla_assemble_kv(const Tensor& kv, const Tensor& k_pe, int64_t nope, const Tensor& k, const Tensor& v);
// dkv overwritten, dk_pe overwritten with the sum over heads.
void mla_assemble_kv_backward(const Tensor& dk, const Tensor& dv, int64_t nope, const Tensor& dkv,
                              const Tensor& dk_pe);

// ---------------------------------------------------------------------------------------------
// SwiGLU: h = silu(g) * u, silu(z) = z / (1 + exp(-z)); g, u, h [T, F].
void swiglu_forward(const Tensor& g, const Tensor& u, const Tensor& h);
void swiglu_backward(const Tensor& g, const Tensor& u, const Tensor& dh, const Tensor& dg, const Tensor& du);
// Rows scaled by a weight each (the routed experts' combine weight applied to their SwiGLU output):
// y[r, :] = w[r] * x[r, :]; x, y [R, F], w [R]. y may alias x.
void scale_rows_forward(const Tensor& x, const Tensor& w, const Tensor& y);
// dx[r, :] = w[r] * dy[r, :], dw[r] = <dy[r, :], x[r, :]> (both overwritten; the dot in double).
void scale_rows_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx,
                         const Tensor& dw);

// ---------------------------------------------------------------------------------------------
// MoE router (DeepSeek-V3 gate). logits [T, E] = x . W_gate^T (a linear op before this).
//   scores = sigmoid(logits) or softmax(logits) over E (unbiased, returned in `scores`);
//   selection scores = scores + bias (bias [E], only if use_bias); with num_groups > 1 the experts
//   split into contiguous groups, group score = sum of the top-2 selection scores of the group
//   (max when !use_bias), the top topk_groups groups are kept, the others masked;
//   idx [T, K] = the top-K selection scores (descending; ties to the lower expert id);
//   weights [T, K] = scores gathered at idx, divided by their sum if norm_topk, times route_scale.
struct RouterParams {
  int64_t num_experts = 0, top_k = 0, num_groups = 1, topk_groups = 1;
  bool sigmoid = true;  // false: softmax
  bool use_bias = false;
  bool norm_topk = true;
  float route_scale = 1.0f;
};
void router_forward(const RouterParams& p, const Tensor& logits, const Tensor& bias, const Tensor& scores,
                    const Tensor& idx, const Tensor& weights);
// dlogits [T, E] (overwritten) from dweights [T, K] through the gathered scores (selection has no
// gradient) plus, if dscores is not empty, an extra gradient on the scores [T, E] (balance loss).
void router_backward(const RouterParams& p, const Tensor& logits, const Tensor& scores, const Tensor& idx,
                     const Tensor& dweights, const Tensor& dscores, const Tensor& dlogits);

// Token dispatch by expert. A plan groups the T*K (token, choice) slots by expert, in token order
// inside an expert; with capacity > 0 an expert keeps only its first `capacity` slots (the others are
// dropped: they contribute nothing and get zero gradient).
//   offsets [E + 1]: rows of expert e are [offsets[e], offsets[e+1]) of the dispatched buffer;
//   slot_of_row [R]: the slot t*K + k each row came from (R = kept slots);
//   row_of_slot [T*K]: the row of each slot, -1 if dropped.
struct DispatchPlan {
  OwnedTensor offsets, slot_of_row, row_of_slot;  // i32
  int64_t tokens = 0, top_k = 0, num_experts = 0, rows = 0, dropped = 0;
};
DispatchPlan make_dispatch_plan(const Tensor& idx, int64_t num_experts, int64_t capacity);
// xs[r, :] = x[slot_of_row[r] / K, :]; x [T, D], xs [R, D]
void dispatch_forward(const DispatchPlan& plan, const Tensor& x, const Tensor& xs);
// dx[t, :] (= or +=) sum of dxs over the rows of token t
void dispatch_backward(const DispatchPlan& plan, const Tensor& dxs, const Tensor& dx,
                       bool accumulate = false);
// y[t, :] (= or +=) sum_k weights[t, k] * ys[row_of_slot[t*K + k], :] over kept slots
void combine_forward(const DispatchPlan& plan, const Tensor& ys, const Tensor& weights, const Tensor& y,
                     bool accumulate = false);
// dys[r, :] = weights[slot] * dy[t, :] (overwritten); dweights[t, k] = <dy[t], ys[row]> (overwritten,
// 0 for dropped slots)
void combine_backward(const DispatchPlan& plan, const Tensor& ys, const Tensor& weights, const Tensor& dy,
                      const Tensor& dys, const Tensor& dweights);

// ---------------------------------------------------------------------------------------------
// Softmax cross-entropy over the vocabulary for a chunk of rows. logits [C, V], targets [C] (i32;
// a target < 0 is ignored: loss 0, gradient 0). losses [C] = lse - logit[target]; lse [C] saved.
// A target >= V throws naming the row.
void cross_entropy_forward(const Tensor& logits, const Tensor& targets, const Tensor& losses,
                           const Tensor& lse);
// In place: logits <- dloss[c] * (softmax(logits) - onehot(target)); dloss [C].
void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                            const Tensor& dloss);

// Vocabulary-parallel cross-entropy (tensor parallelism): `logits` [C, Vs] are columns [first,
// first + Vs) of the full [C, V] logits. Forward gives per row the log-sum-exp of the shard's columns,
// shard_lse [C], and target_logit [C] = logits[c, targets[c] - first] when the target lies in the
// shard, else 0 (targets < 0 are ignored rows: 0). The caller combines the shards: lse =
// log(sum_shards exp(shard_lse)), target logit = sum over shards, loss = lse - target logit. Targets
// must be < vocab, the full vocabulary size (a bad one names its row).
void cross_entropy_shard_forward(const Tensor& logits, const Tensor& targets, int64_t first, int64_t vocab,
                                 const Tensor& shard_lse, const Tensor& target_logit);
// In place, with lse [C] the combined (full-vocabulary) log-sum-exp: logits <- dloss[c] *
// (exp(logits - lse[c]) - onehot(targets[c] - first)) (the onehot only when the target is in the
// shard); rows with targets < 0 become 0.
void cross_entropy_shard_backward(const Tensor& logits, const Tensor& targets, int64_t first, int64_t vocab,
                                  const Tensor& lse, const Tensor& dloss);

// ---------------------------------------------------------------------------------------------
// Complementary sequence-wise balance loss (DeepSeek-V3 report, eqs. 17-20), averaged over the B
// sequences: for each sequence of S tokens, s'_{t,i} = scores[t,i] / sum_j scores[t,j],
// P_i = mean_t s'_{t,i}, f_i = E / (K * S) * count_t(i in idx[t]), loss_b = alpha * sum_i f_i P_i.
// scores [B*S, E] (unbiased), idx [B*S, K]. Returns the mean over sequences.
double seq_balance_loss_forward(const Tensor& scores, const Tensor& idx, int64_t batch, double alpha);
// dscores (+=) the gradient of dloss * loss w.r.t. scores (f is a constant).
void seq_balance_loss_backward(const Tensor& scores, const Tensor& idx, int64_t batch, double alpha,
                               double dloss, const Tensor& dscores);

}  // namespace dsv3::ops
