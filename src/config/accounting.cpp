// Parameter, FLOP and memory accounting for DeepSeek-V3 models; see accounting.hpp.
#include "config/accounting.hpp"

#include <algorithm>
#include <cmath>

#include "core/format.hpp"

namespace dsv3 {

int64_t ParamCounts::total() const {
  return embedding.total + attention.total + dense_ffn.total + routed_experts.total + shared_experts.total +
         router.total + norms.total + head.total;
}
int64_t ParamCounts::active() const {
  return embedding.active + attention.active + dense_ffn.active + routed_experts.active +
         shared_experts.active + router.active + norms.active + head.active;
}
std::vector<std::pair<std::string, ComponentParams>> ParamCounts::rows() const {
  return {{"embedding", embedding},
          {"attention (MLA)", attention},
          {"dense FFN", dense_ffn},
          {"routed experts", routed_experts},
          {"shared experts", shared_experts},
          {"router", router},
          {"norms", norms},
          {"output head", head},
          {"MTP modules (own)", mtp}};
}

namespace {
// MLA weights that every TP rank holds whole (down-projections and their norms).
int64_t mla_replicated(const ModelConfig& m) {
  const auto& a = m.mla;
  int64_t p = m.d_model * (a.d_latent + a.qk_rope_head_dim) + a.d_latent;  // kv_a_proj_with_mqa, kv norm
  if (a.q_lora_rank > 0) p += m.d_model * a.q_lora_rank + a.q_lora_rank;   // q_a_proj, q norm
  return p;
}
// MLA weights split by head across TP ranks (q_b or q, kv_b, o).
int64_t mla_head_split(const ModelConfig& m) {
  const auto& a = m.mla;
  const int64_t q_in = a.q_lora_rank > 0 ? a.q_lora_rank : m.d_model;
  return q_in * m.num_heads * m.qk_head_dim() +
         a.d_latent * m.num_heads * (a.qk_nope_head_dim + a.v_head_dim) +
         m.num_heads * a.v_head_dim * m.d_model;
}
int64_t routed_expert_params(const ModelConfig& m) { return swiglu_params(m.d_model, m.moe.expert_dim); }
int64_t shared_expert_params(const ModelConfig& m) {
  return swiglu_params(m.d_model, m.moe.expert_dim * m.moe.num_shared_experts);
}
int64_t router_params(const ModelConfig& m) { return m.moe.num_experts * m.d_model; }
}  // namespace

int64_t mla_params(const ModelConfig& m) { return mla_replicated(m) + mla_head_split(m); }
int64_t swiglu_params(int64_t d_model, int64_t width) { return 3 * d_model * width; }
int64_t moe_layer_params(const ModelConfig& m) {
  return router_params(m) + m.moe.num_experts * routed_expert_params(m) + shared_expert_params(m);
}
int64_t mtp_module_params(const ModelConfig& m) {
  const int64_t d = m.d_model;
  // enorm + hnorm + eh_proj [d, 2d] + a full (MoE) block + shared_head.norm.
  return 2 * d + 2 * d * d + (2 * d + mla_params(m) + moe_layer_params(m)) + d;
}

ParamCounts count_parameters(const ModelConfig& m) {
  ParamCounts p;
  const int64_t d = m.d_model, L = m.num_layers, Ld = m.num_dense_layers, Lm = m.num_moe_layers();
  p.embedding = {m.vocab_size * d, m.vocab_size * d};
  p.head = {m.vocab_size * d, m.vocab_size * d};
  p.attention.total = p.attention.active = L * mla_params(m);
  p.dense_ffn.total = p.dense_ffn.active = Ld * swiglu_params(d, m.ffn_dim);
  p.routed_experts.total = Lm * m.moe.num_experts * routed_expert_params(m);
  p.routed_experts.active = Lm * m.moe.num_experts_per_token * routed_expert_params(m);
  p.shared_experts.total = p.shared_experts.active = Lm * shared_expert_params(m);
  p.router.total = p.router.active = Lm * router_params(m);
  // Two RMSNorms per block plus the MLA latent norms (counted in attention) plus the final norm.
  p.norms.total = p.norms.active = L * 2 * d + d;
  const int64_t mtp_total = m.mtp.depth * mtp_module_params(m);
  const int64_t mtp_active =
      m.mtp.depth *
      (mtp_module_params(m) - (m.moe.num_experts - m.moe.num_experts_per_token) * routed_expert_params(m));
  p.mtp = {mtp_total, mtp_active};
  return p;
}

FlopsPerToken training_flops_per_token(const ModelConfig& m, int64_t seq) {
  const int64_t d = m.d_model;
  // Matmul weights a token multiplies with (the embedding is a lookup; norms are elementwise).
  const double block_dense = mla_params(m) - m.mla.d_latent - m.mla.q_lora_rank;  // minus norm weights
  const double moe_active =
      router_params(m) + m.moe.num_experts_per_token * routed_expert_params(m) + shared_expert_params(m);
  double active_matmul = m.num_layers * block_dense + m.num_dense_layers * swiglu_params(d, m.ffn_dim) +
                         m.num_moe_layers() * moe_active + double(m.vocab_size) * d;
  // Each MTP module: eh_proj, one MoE block and the shared head once more.
  active_matmul += m.mtp.depth * (2.0 * d * d + block_dense + moe_active + double(m.vocab_size) * d);
  FlopsPerToken f;
  f.matmul = 6.0 * active_matmul;
  // Causal attention: a token attends to (seq+1)/2 positions on average; per position QK^T costs
  // 2*H*(nope+rope) and PV 2*H*v FLOPs forward; backward is twice the forward.
  const double ctx = (seq + 1) / 2.0;
  const double per_layer = 2.0 * m.num_heads * (m.qk_head_dim() + m.mla.v_head_dim) * ctx;
  f.attention = 3.0 * per_layer * (m.num_layers + m.mtp.depth);
  return f;
}

MemoryOptions MemoryOptions::from(const Config& c) {
  MemoryOptions o;
  o.recompute = c.training.recompute;
  o.recompute_modules = c.training.recompute_modules;
  o.micro_batch_size = c.training.micro_batch_size;
  o.seq_length = c.training.seq_length;
  o.global_batch_size = c.training.global_batch_size;
  o.precision = c.training.precision;
  o.fp8 = c.training.use_fp8;
  o.bf16_moments = c.training.optimizer.moment_dtype == "bf16";
  return o;
}

int64_t layers_in_stage(int64_t num_layers, int64_t pp, int64_t stage, int64_t last_layers) {
  if (last_layers > 0 && pp > 1) {
    if (stage == pp - 1) return last_layers;
    num_layers -= last_layers, pp -= 1;
  }
  return num_layers / pp + (stage < num_layers % pp ? 1 : 0);
}
int64_t first_layer_of_stage(int64_t num_layers, int64_t pp, int64_t stage, int64_t last_layers) {
  int64_t first = 0;
  for (int64_t s = 0; s < stage; ++s) first += layers_in_stage(num_layers, pp, s, last_layers);
  return first;
}

namespace {
// Elements one block saves per token for its backward (one micro-batch), mirroring src/model:
// Block::Saved, MLA::Saved, SwiGLU::Saved and MoE::Saved. Head-split tensors are divided by TP;
// d-sized tensors by TP only under sequence parallelism. Statistics (rstd, lse) count as elements.
double d_local(const ModelConfig& m, const Layout& l) {
  return l.sequence_parallel ? double(m.d_model) / l.tp : double(m.d_model);
}
double mla_saved_elems(const ModelConfig& m, const Layout& l, const RecomputeSet& r, double elem_bytes,
                       bool fp8_kv) {
  const auto& a = m.mla;
  const double d = d_local(m, l), h = double(m.num_heads) / l.tp;
  // Under sequence parallelism a block keeps its normed inputs as gathered to all T rows.
  const double normed = l.sequence_parallel ? double(m.d_model) : d;
  double e = d;                                                       // block input x (held by the model)
  e += (r.norms ? 0 : normed) + 1;                                    // xn, rstd
  if (a.q_lora_rank > 0) e += a.q_lora_rank * (r.norms ? 1 : 2) + 1;  // q_a output, its norm, rstd
  const double kva = a.d_latent + a.qk_rope_head_dim;
  const double qkv = r.mla_up_proj ? 0 : 2 * h * m.qk_head_dim() + h * a.v_head_dim;  // q, k, v
  if (fp8_kv) {
    // The normed latent RMSNorm(c) in FP8 with a 4-byte scale per 1 x 128 tile (counted in elements
    // of elem_bytes) and the kv_a output [c ; k_pe]; c's copy, its norm, k and v are rebuilt from
    // them in the backward.
    const double rkv = a.d_latent;
    e += (rkv + 4 * std::ceil(rkv / 128)) / elem_bytes + kva + 1;  // FP8 RMSNorm(c), kv_a output, rstd
    e += (r.mla_up_proj ? 0 : h * m.qk_head_dim());                // q
  } else {
    e += kva;                                 // kv_a output [c ; k_pe]
    e += a.d_latent * (r.norms ? 1 : 2) + 1;  // c, its norm, rstd
    e += qkv;
  }
  e += h * a.v_head_dim + h;  // o, lse
  e += d;                     // h = x + attention (FFN input)
  return e;
}
double swiglu_saved_elems(double width, bool recompute_swiglu) {
  return 2 * width + (recompute_swiglu ? 0 : width);  // gate & up outputs, silu(g)*u
}
// The routed-expert rows a rank holds per token of the micro-batch: each TP rank dispatches only its
// own 1/TP of the tokens (ModelParallel::owned_begin) and, at perfect balance, its experts receive as
// many rows as it sent: top-k / TP rows a token.
double routed_rows_per_token(const ModelConfig& m, const Layout& l) {
  return double(m.moe.num_experts_per_token) / l.tp;
}
double ffn_saved_elems(const ModelConfig& m, const Layout& l, const RecomputeSet& r, bool moe,
                       double elem_bytes) {
  double e = (r.norms ? 0 : (l.sequence_parallel ? double(m.d_model) : d_local(m, l))) + 1;  // hn, rstd
  if (!moe) return e + swiglu_saved_elems(double(m.ffn_dim) / l.tp, r.swiglu);
  const auto& x = m.moe;
  const double k = x.num_experts_per_token, rows = routed_rows_per_token(m, l);
  e += 2 * x.num_experts + 2 * k + 2 * k;  // router logits, scores, top-k ids, weights, dispatch plan
  if (x.deep_ep_fp8)  // expert inputs kept as the FP8 rows that were dispatched (codes + tile scales)
    e += rows * (m.d_model + 4 * std::ceil(m.d_model / 128.0)) / elem_bytes;
  else
    e += rows * m.d_model;  // dispatched token copies (expert GEMM input)
  e += rows * swiglu_saved_elems(double(x.expert_dim) / l.expert_tp, r.swiglu);
  e += rows * 4 / elem_bytes;  // each expert row's combine weight (f32); the expert outputs are not kept
  if (x.num_shared_experts > 0)
    e += swiglu_saved_elems(double(x.expert_dim * x.num_shared_experts) / l.tp, r.swiglu);
  return e;
}
// Temporaries alive while one block runs its backward (per token): the block's dhn, dh, dxn and
// the larger of the FFN's and the attention's own gradient buffers.
double block_backward_workspace_elems(const ModelConfig& m, const Layout& l, bool moe) {
  const auto& a = m.mla;
  const double d = d_local(m, l), h = double(m.num_heads) / l.tp;
  double ffn = 0;
  if (moe) {
    const auto& x = m.moe;
    const double rows = routed_rows_per_token(m, l), k = x.num_experts_per_token;
    // The experts' backward: d rows in and out, the weighted product and its gradient, dh, dg, du, the
    // row weights' gradients (routed rows), and the router's. Then, when rows were exchanged (TP or
    // EP), the combine of the input gradients: the rows that come back into all k plan rows a token
    // and, under TP, this rank's partial sum.
    ffn = 2 * rows * m.d_model + 2 * rows + 5 * rows * double(x.expert_dim) / l.expert_tp + 2 * x.num_experts;
    if (l.tp > 1 || l.ep > 1) ffn = std::max(ffn, (rows + k) * m.d_model + (l.tp > 1 ? m.d_model : 0.0));
    if (x.num_shared_experts > 0) ffn = std::max(ffn, 3.0 * x.expert_dim * x.num_shared_experts / l.tp);
  } else {
    ffn = 3.0 * m.ffn_dim / l.tp;
  }
  double attn = d + h * a.v_head_dim * 2 + 2 * h * m.qk_head_dim() + h * (a.qk_nope_head_dim + a.v_head_dim) +
                a.qk_rope_head_dim + 2 * a.d_latent + a.d_latent + a.qk_rope_head_dim + 2 * a.q_lora_rank;
  return 2 * d + std::max(ffn, attn);
}
}  // namespace

double activation_bytes_per_token_dense_layer(const ModelConfig& m, const Layout& l, const RecomputeSet& r,
                                              double elem_bytes) {
  if (r.full) return elem_bytes * d_local(m, l);
  return elem_bytes * (mla_saved_elems(m, l, r, elem_bytes, m.mla.use_fp8_kv) +
                       ffn_saved_elems(m, l, r, false, elem_bytes));
}
double activation_bytes_per_token_moe_layer(const ModelConfig& m, const Layout& l, const RecomputeSet& r,
                                            double elem_bytes) {
  if (r.full) return elem_bytes * d_local(m, l);
  return elem_bytes * (mla_saved_elems(m, l, r, elem_bytes, m.mla.use_fp8_kv) +
                       ffn_saved_elems(m, l, r, true, elem_bytes));
}

namespace {
// Whether the model has an MoE block (the MTP modules' blocks are MoE).
bool has_moe_block(const ModelConfig& m) { return m.num_moe_layers() > 0 || m.mtp.depth > 0; }
}  // namespace

double activation_workspace_bytes_per_token(const ModelConfig& m, const Layout& l, const RecomputeSet& r,
                                            double elem_bytes) {
  double ws = block_backward_workspace_elems(m, l, has_moe_block(m));
  if (m.num_dense_layers > 0) ws = std::max(ws, block_backward_workspace_elems(m, l, false));
  // The block being differentiated first rebuilds what it dropped: everything under full, the
  // selected modules' tensors otherwise.
  if (r.any()) {
    const RecomputeSet none;
    double rebuilt = 0;
    if (has_moe_block(m))
      rebuilt = activation_bytes_per_token_moe_layer(m, l, none, elem_bytes) -
                activation_bytes_per_token_moe_layer(m, l, r, elem_bytes);
    if (m.num_dense_layers > 0)
      rebuilt = std::max(rebuilt, activation_bytes_per_token_dense_layer(m, l, none, elem_bytes) -
                                      activation_bytes_per_token_dense_layer(m, l, r, elem_bytes));
    ws += rebuilt / elem_bytes;
  }
  // The model keeps two gradient buffers of the hidden state (dh, dx) during the backward.
  return elem_bytes * (ws + 2 * d_local(m, l));
}

namespace {
// The FP8 GEMMs of the host backend (ops::fp8_linear_*). Each GEMM runs in one scratch buffer that is
// kept between GEMMs and grows to the largest of the stage's (dense layers included): the decoded
// operands and the fp32 accumulator and chunk partials, per token 4 B per element of K and 8 B per
// output in Fprop, the same with K and N swapped in Dgrad, 4 B per element of each of dy and x in
// Wgrad (whose accumulator is weight-sized). The E4M3 codes a GEMM quantizes live in a second kept
// buffer, which grows to the largest call's: per token 1 B per element of x in Fprop, of dy in Dgrad,
// of both in Wgrad (the bf16 operands are quantized as they are, without an f32 copy). Per weight: its
// codes (1 B, in the codes buffer) and, in the scratch, its decoded values (4 B, Fprop and Dgrad) or
// Wgrad's accumulator and partials (8 B); as both buffers keep their largest, 9 B. A routed expert's GEMM
// takes only the rows routed to it: each token at most once from each of the EP ranks, min(top-k, EP) rows
// per token a rank dispatches at most (its 1/TP of the micro-batch).
struct GemmShape {
  double k, n, rows_per_token;
};
std::vector<GemmShape> fp8_gemms(const ModelConfig& m, const Layout& l, bool moe) {
  const auto& a = m.mla;
  const double h = double(m.num_heads) / l.tp, d = m.d_model;
  std::vector<GemmShape> g = {{d, a.d_latent + double(a.qk_rope_head_dim), 1},
                              {double(a.d_latent), h * (a.qk_nope_head_dim + a.v_head_dim), 1},
                              {h * a.v_head_dim, d, 1}};
  if (a.q_lora_rank > 0)
    g.push_back({d, double(a.q_lora_rank), 1}), g.push_back({double(a.q_lora_rank), h * m.qk_head_dim(), 1});
  else
    g.push_back({d, h * m.qk_head_dim(), 1});
  if (!moe) {
    g.push_back({d, double(m.ffn_dim) / l.tp, 1}), g.push_back({double(m.ffn_dim) / l.tp, d, 1});
    return g;
  }
  const double rows =
      double(std::min<int64_t>(m.moe.num_experts_per_token, std::max<int64_t>(1, l.ep))) / double(l.tp);
  const double f = double(m.moe.expert_dim) / l.expert_tp;
  g.push_back({d, f, rows}), g.push_back({f, d, rows});
  if (m.moe.num_shared_experts > 0) {
    const double fs = double(m.moe.expert_dim * m.moe.num_shared_experts) / l.tp;
    g.push_back({d, fs, 1}), g.push_back({fs, d, 1});
  }
  return g;
}
// Every FP8 GEMM of the stage's layers: the dense layers' and the MoE blocks'.
std::vector<GemmShape> all_fp8_gemms(const ModelConfig& m, const Layout& l) {
  std::vector<GemmShape> g;
  if (m.num_dense_layers > 0) g = fp8_gemms(m, l, false);
  if (has_moe_block(m)) {
    const std::vector<GemmShape> moe = fp8_gemms(m, l, true);
    g.insert(g.end(), moe.begin(), moe.end());
  }
  return g;
}
double fp8_gemm_token_bytes(const ModelConfig& m, const Layout& l) {
  double scratch = 0, codes = 0;
  for (const GemmShape& s : all_fp8_gemms(m, l)) {
    scratch = std::max(
        scratch, s.rows_per_token * std::max({4 * s.k + 8 * s.n, 4 * s.n + 8 * s.k, 4 * s.n + 4 * s.k}));
    codes = std::max(codes, s.rows_per_token * (s.n + s.k));
  }
  return scratch + codes;
}
}  // namespace

double fp8_gemm_weight_bytes(const ModelConfig& m, const Layout& l) {
  double worst = 0;
  for (const GemmShape& s : all_fp8_gemms(m, l)) worst = std::max(worst, 9 * s.k * s.n);
  return worst;
}

double host_workspace_bytes_per_token(const ModelConfig& m, const Layout& l, const MemoryOptions& o,
                                      double act_bytes) {
  const RecomputeSet r = o.recompute_set();
  if (!o.host) return activation_workspace_bytes_per_token(m, l, r, act_bytes);
  // Host temporaries are f32. Under bf16 the block in its backward holds its saved tensors back in
  // f32 (c, its norm, k and v rebuilt from the kv_a output and the FP8 normed latent), in place of
  // their stored copies, and with what recompute rebuilds: the whole layer as without recompute,
  // counted here.
  const bool restored = o.precision == "bf16" && !r.full;
  double ws = activation_workspace_bytes_per_token(m, l, restored ? RecomputeSet{} : r, 4.0);
  if (restored) {
    // Restored to f32, with what selective recompute rebuilds: the whole layer as without recompute.
    ModelConfig plain = m;
    plain.mla.use_fp8_kv = false, plain.moe.deep_ep_fp8 = false;
    double extra = 0;
    if (has_moe_block(m))
      extra = activation_bytes_per_token_moe_layer(plain, l, RecomputeSet{}, 4.0) -
              activation_bytes_per_token_moe_layer(m, l, r, act_bytes);
    if (m.num_dense_layers > 0)
      extra = std::max(extra, activation_bytes_per_token_dense_layer(plain, l, RecomputeSet{}, 4.0) -
                                  activation_bytes_per_token_dense_layer(m, l, r, act_bytes));
    ws += extra;
  }
  if (o.fp8) ws += fp8_gemm_token_bytes(m, l);
  return ws;
}

MemoryEstimate memory_per_gpu(const Config& c, const Layout& l, const MemoryOptions& o) {
  const ModelConfig& m = c.model;
  const bool bf16 = o.precision == "bf16";
  // Model weights as forward/backward use them; on the host backend a bf16 run also keeps its fp32
  // masters whole on every rank (they are what the optimizer updates).
  const double w_bytes = bf16 ? (o.host ? 2 + 4 : 2) : 4;
  const double g_bytes = 4;  // gradients accumulate in fp32
  const double moment_bytes = o.bf16_moments ? 2 : 4;
  // fp32 master (bf16 on a GPU; the host keeps it with the weights) + Adam m and v
  const double opt_bytes = (bf16 && !o.host ? 4 : 0) + 2 * moment_bytes;
  const double act_bytes = bf16 ? 2 : 4;
  // Hidden states and gradients the model holds outside the blocks: f32 on the host backend.
  const double held = o.host ? 4.0 : act_bytes;
  const double d = m.d_model;
  const double V = m.vocab_size;
  const int64_t dp = std::max<int64_t>(1, l.dp);
  Layout lay = l;
  lay.dp = dp;
  const double edp = std::max<double>(1.0, double(lay.tp * dp) / (lay.ep * lay.expert_tp));
  const int64_t microbatches = std::max<int64_t>(1, o.global_batch_size / (o.micro_batch_size * dp));
  const double tokens = double(o.micro_batch_size) * o.seq_length;
  const RecomputeSet rset = o.recompute_set();

  MemoryEstimate best;
  for (int64_t s = 0; s < l.pp; ++s) {
    // Parameters on this stage, split into the DP-sharded dense part and the expert part.
    double dense = 0, expert = 0;
    const int64_t first = first_layer_of_stage(m.num_layers, l.pp, s, l.last_stage_layers);
    const int64_t n = layers_in_stage(m.num_layers, l.pp, s, l.last_stage_layers);
    double act = 0;
    // Per-rank weights of one block outside the routed experts: norms, MLA (down-projections whole,
    // head-split parts / tp), and the dense FFN or the router + shared experts (/ tp).
    auto block_dense = [&](bool moe) {
      double p = 2 * d + mla_replicated(m) + double(mla_head_split(m)) / l.tp;
      if (!moe) return p + double(swiglu_params(m.d_model, m.ffn_dim)) / l.tp;
      return p + router_params(m) + double(shared_expert_params(m)) / l.tp;
    };
    const double experts_on_rank = double(m.moe.num_experts / l.ep) * routed_expert_params(m) / l.expert_tp;
    for (int64_t i = first; i < first + n; ++i) {
      const bool moe = i >= m.num_dense_layers;
      dense += block_dense(moe);
      if (moe) expert += experts_on_rank;
      act += moe ? activation_bytes_per_token_moe_layer(m, lay, rset, act_bytes)
                 : activation_bytes_per_token_dense_layer(m, lay, rset, act_bytes);
    }
    double logits = 0, dispatch = 0;
    if (s == 0) dense += V * d / l.tp;  // embedding (vocab-parallel)
    if (s == l.pp - 1) {
      dense += d + V * d / l.tp;  // final norm, head
      if (m.mtp.depth > 0) {
        // enorm, hnorm, eh_proj (replicated over TP), one MoE block, shared_head.norm.
        dense += m.mtp.depth * (3 * d + 2 * d * d + block_dense(true));
        expert += m.mtp.depth * experts_on_rank;
        if (l.pp > 1) dense += V * d / l.tp;  // the MTP modules' copy of the embedding
        // Per module: its block, the concatenation of the two normed halves and the eh_proj output
        // (MTPModule::Saved), ids and two rstd; the embedding, the module output and its gradient
        // (held by the model: f32 on the host).
        act += m.mtp.depth * (activation_bytes_per_token_moe_layer(m, lay, rset, act_bytes) +
                              act_bytes * 3 * d + held * 3 * d + 4 * 3);
      }
      // Last hidden state, and the head's normed input, rstd and its gradient.
      act += held * (3 * d + 1);
      // Chunked cross-entropy: one chunk of fp32 logits and their gradient at a time.
      const double chunk = std::min(tokens, std::max(1.0, std::floor(double(1 << 22) / (V / l.tp))));
      logits = 4 * chunk * (V / l.tp + 3);  // one chunk of logits (its gradient in place), losses, lse, dloss
    }
    // Persistent all-to-all buffers (DeepEP's) on a GPU; the host exchange stages its rows only for the
    // length of a call, and what arrives is the saved expert input already counted above.
    if (m.num_moe_layers() > 0 && l.ep > 1 && !o.host) {
      const double cf = m.moe.capacity_factor > 0 ? m.moe.capacity_factor : 1.0;
      // send + receive of the rank's routed rows: bf16 rows, or FP8 rows with their tile scales
      const double row = m.moe.deep_ep_fp8 ? d + 4 * std::ceil(d / 128) : d * act_bytes;
      dispatch = 2 * tokens * routed_rows_per_token(m, lay) * row * cf;
    }
    // 1F1B: stage s keeps up to pp - s micro-batches' activations alive. Interleaved (vp model chunks
    // a rank, each 1/vp of its layers): Megatron-Core's warm-up, (pp - s - 1) * 2 + (vp - 1) * pp
    // chunk passes, plus the one in flight, counted in units of whole micro-batches of the rank.
    const int64_t vp = std::max<int64_t>(1, l.virtual_stages);
    const double in_flight_chunks =
        vp == 1 ? double(std::min<int64_t>(microbatches, l.pp - s))
                : double(std::min<int64_t>(microbatches * vp, (l.pp - s - 1) * 2 + (vp - 1) * l.pp + 1));
    const double in_flight_mb = in_flight_chunks / double(vp);
    const int64_t in_flight = static_cast<int64_t>(std::ceil(in_flight_mb));
    MemoryEstimate e;
    e.stage = s;
    e.in_flight_microbatches = in_flight;
    e.params_on_rank = static_cast<int64_t>(dense + expert);
    e.weights = (dense + expert) * w_bytes;
    const bool z1 = l.zero_stage >= 1, z2 = l.zero_stage >= 2;
    e.gradients = dense * g_bytes / (z2 ? dp : 1) + expert * g_bytes / (z2 ? edp : 1);
    e.optimizer = dense * opt_bytes / (z1 ? dp : 1) + expert * opt_bytes / (z1 ? edp : 1);
    e.activations = act * tokens * in_flight_mb +
                    host_workspace_bytes_per_token(m, lay, o, act_bytes) * tokens +
                    (o.host && o.fp8 ? fp8_gemm_weight_bytes(m, lay) : 0.0);
    e.logits = logits;
    e.moe_dispatch = dispatch;
    if (s == 0 || e.total() > best.total()) best = e;
  }
  best.assumptions = {
      "weights " + std::string(bf16 ? "bf16 (2 B)" : "fp32 (4 B)") + ", gradients fp32 (4 B), optimizer " +
          (bf16 && !o.host ? "fp32 master + " : "") + "Adam m, v " + (o.bf16_moments ? "bf16" : "fp32") +
          " (" + fixed(opt_bytes, 0) + " B) per parameter",
      "ZeRO-" + std::to_string(l.zero_stage) + ": optimizer" + (l.zero_stage >= 2 ? " and gradients" : "") +
          (l.zero_stage >= 1
               ? " sharded over DP=" + std::to_string(dp) + " (experts over expert-DP=" + fixed(edp, 0) + ")"
               : " replicated"),
      "activations " + std::string(bf16 ? "bf16" : "fp32") + ", recompute " + rset.text() + ", " +
          std::to_string(o.micro_batch_size) + " x " + std::to_string(o.seq_length) +
          " tokens per micro-batch, " + std::to_string(best.in_flight_microbatches) + " in flight on stage " +
          std::to_string(best.stage) +
          (l.virtual_stages > 1
               ? " (interleaved 1F1B, " + std::to_string(l.virtual_stages) + " chunks a rank)"
               : std::string(" (1F1B)")),
      "flash-style attention (no seq^2 buffer); cross-entropy over chunks of 4M logits; backward workspace "
      "of one block",
      "MoE dispatch buffers at " +
          std::string(m.moe.capacity_factor > 0 ? "capacity factor" : "perfect balance") +
          " when EP>1; not included: CUDA context, NCCL buffers, allocator fragmentation"};
  return best;
}

}  // namespace dsv3
