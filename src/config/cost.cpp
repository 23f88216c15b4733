// Step-time model; see cost.hpp.
#include "config/cost.hpp"

#include <algorithm>
#include <cmath>

#include "config/accounting.hpp"
#include "core/format.hpp"

namespace dsv3 {

HardwareSpec hardware_spec(const HardwareConfig& h) {
  HardwareSpec s;
  const std::string& t = h.gpu_type;
  auto has = [&](const char* k) { return t.find(k) != std::string::npos; };
  if (has("GB200")) {
    s = {"GB200",
         2500,
         2,
         900,
         100,
         72,
         8000,
         "NVIDIA GB200 NVL72 datasheet: 2.5 PFLOPS dense bf16 per GPU, HBM3e 8 TB/s, NVLink 5 1.8 TB/s "
         "bidirectional, 72 GPUs per NVLink domain; one 800 Gb/s NIC per GPU"};
  } else if (has("H800")) {
    s = {"H800",
         989,
         2,
         160,
         50,
         8,
         3350,
         "DeepSeek-V3 report 3.2.2: NVLink 160 GB/s and InfiniBand 50 GB/s per GPU; bf16 peak as H100"};
  } else if (has("H200")) {
    s = {"H200",
         989,
         2,
         450,
         50,
         8,
         4800,
         "NVIDIA H200 datasheet: 989 TFLOPS dense bf16, HBM3e 4.8 TB/s, NVLink 900 GB/s bidirectional; one "
         "400 Gb/s NIC per GPU"};
  } else {
    s = {"H100",
         989,
         2,
         450,
         50,
         8,
         3350,
         "NVIDIA H100 SXM datasheet: 989 TFLOPS dense bf16, HBM3 3.35 TB/s, NVLink 900 GB/s bidirectional; "
         "one 400 Gb/s NIC per GPU"};
    if (!has("H100")) s.source = "no table entry for '" + t + "': H100 SXM values (" + s.source + ")";
  }
  s.peak_tflops = h.peak_tflops;  // the config's value (default 989) is what the user set
  if (h.nvlink_gbps > 0) s.nvlink_gbps = h.nvlink_gbps;
  if (h.ib_gbps > 0) s.ib_gbps = h.ib_gbps;
  if (h.gpus_per_node > 0) s.gpus_per_node = h.gpus_per_node;
  return s;
}

double recompute_flops_per_token(const ModelConfig& m, int64_t seq, const RecomputeSet& r) {
  const double layers = double(m.num_layers + m.mtp.depth);
  if (r.full) {
    // One more forward of every block: a third of the training FLOPs less the head's and the
    // embedding's share (they are not re-run).
    const FlopsPerToken f = training_flops_per_token(m, seq);
    const double head = 6.0 * double(m.vocab_size) * m.d_model * (1 + m.mtp.depth);
    return (f.matmul - head) / 3 + f.attention / 3;
  }
  if (!r.mla_up_proj) return 0;
  const auto& a = m.mla;
  const double q_in = a.q_lora_rank > 0 ? a.q_lora_rank : m.d_model;
  return layers * 2.0 *
         (q_in * m.num_heads * m.qk_head_dim() +
          double(a.d_latent) * m.num_heads * (a.qk_nope_head_dim + a.v_head_dim));
}

double recompute_bytes_per_token(const ModelConfig& m, const RecomputeSet& r, double elem_bytes) {
  if (r.full || !(r.norms || r.swiglu)) return 0;
  RecomputeSet only = r;
  only.mla_up_proj = false;  // its GEMMs are counted as FLOPs
  Layout one;
  const double moe = activation_bytes_per_token_moe_layer(m, one, RecomputeSet{}, elem_bytes) -
                     activation_bytes_per_token_moe_layer(m, one, only, elem_bytes);
  const double dense = activation_bytes_per_token_dense_layer(m, one, RecomputeSet{}, elem_bytes) -
                       activation_bytes_per_token_dense_layer(m, one, only, elem_bytes);
  // Written once, and about twice as much read (a norm reads its input, SwiGLU reads g and u).
  return 3 * (double(m.num_moe_layers() + m.mtp.depth) * moe + double(m.num_dense_layers) * dense);
}

StepCost step_cost(const Config& c, const Layout& l, const RecomputeSet& r, const HardwareSpec& hw) {
  const ModelConfig& m = c.model;
  const auto& t = c.training;
  StepCost s;
  const double gpus = double(l.world());
  const double tokens = double(t.global_batch_size) * t.seq_length;  // per step
  const double dp = double(std::max<int64_t>(1, l.dp));
  const double rate = hw.peak_tflops * 1e12 * c.hardware.assumed_mfu;
  const double fp8 = t.use_fp8 ? hw.fp8_factor : 1.0;
  const FlopsPerToken f = training_flops_per_token(m, t.seq_length);
  s.compute_s = tokens * (f.matmul / fp8 + f.attention) / (gpus * rate);
  // The recomputed forward: GEMMs (FP8 under use_fp8) and, under full, attention.
  const double rf = recompute_flops_per_token(m, t.seq_length, r);
  const double rf_attn = r.full ? f.attention / 3 : 0;
  s.recompute_s = tokens * ((rf - rf_attn) / fp8 + rf_attn) / (gpus * rate);
  // The rebuilt bytes of all tokens and layers, spread over the GPUs (TP splits them, PP the layers).
  const double act_bytes = t.precision == "bf16" ? 2 : 4;
  s.recompute_s += tokens * recompute_bytes_per_token(m, r, act_bytes) / (gpus * hw.hbm_gbps * 1e9);

  const double node = double(hw.gpus_per_node);
  const double layers_per_rank = double(m.num_layers + m.mtp.depth) / l.pp;
  const double tokens_per_rank = tokens / dp;  // each DP rank's share, seen by all its TP peers
  // TP: per layer, forward, the attention and the FFN each move the [T, d] bf16 hidden state twice
  // (an all-gather in and a reduce-scatter out under sequence parallelism, or one all-reduce out,
  // which moves the same bytes): 4 units; the backward 4 more; full recompute repeats the forward's.
  if (l.tp > 1) {
    s.tp_inside_node = l.tp <= node;
    const double per_layer = (8.0 + (r.full ? 4.0 : 0.0)) * (l.tp - 1.0) / l.tp * m.d_model * 2.0;
    s.tp_s = tokens_per_rank * layers_per_rank * per_layer /
             ((s.tp_inside_node ? hw.nvlink_gbps : hw.ib_gbps) * 1e9);
  }
  // EP: each MoE layer dispatches K rows a token (FP8 codes + scales under deep_ep_fp8, else bf16)
  // and combines K bf16 rows; the backward sends the row gradients both ways; full recompute
  // dispatches and combines once more. Rows for the rank's own experts stay local.
  if (l.ep > 1 && m.num_moe_layers() > 0) {
    s.ep_inside_node = l.tp * l.ep <= node;  // ranks tp-major, EP next (parallel.order tp-ep-dp-pp)
    const double k = m.moe.num_experts_per_token, d = m.d_model;
    const double disp = m.moe.deep_ep_fp8 ? d + 4 * std::ceil(d / 128) : 2 * d;
    const double per_token_layer = k * ((disp + 2 * d) * (r.full ? 2 : 1) + 4 * d) * (l.ep - 1.0) / l.ep;
    const double moe_layers_per_rank = double(m.num_moe_layers() + m.mtp.depth) / l.pp;
    s.ep_s = tokens_per_rank / l.tp * moe_layers_per_rank * per_token_layer /
             ((s.ep_inside_node ? hw.nvlink_gbps : hw.ib_gbps) * 1e9);
  }
  // DP: the rank's fp32 gradients reduced over DP (ring all-reduce: 2 (n-1)/n of the bytes; ZeRO-1/2
  // reduce-scatter them and all-gather the bf16 parameters instead), dense parts over DP, experts over
  // the expert-DP group.
  {
    MemoryOptions o = MemoryOptions::from(c);
    const MemoryEstimate me = memory_per_gpu(c, l, o);
    const double params = double(me.params_on_rank);
    // ZeRO-2 keeps only its shard of the gradients, so every micro-batch's are reduce-scattered.
    const double mb =
        double(std::max<int64_t>(1, t.global_batch_size / (t.micro_batch_size * std::max<int64_t>(1, l.dp))));
    const double per_param = l.zero_stage >= 2 ? 4.0 * mb + 2.0 : l.zero_stage == 1 ? 4.0 + 2.0 : 2 * 4.0;
    const double frac = (dp - 1) / dp;
    const bool one_node = gpus <= node;
    s.dp_s = dp > 1 ? params * per_param * frac / ((one_node ? hw.nvlink_gbps : hw.ib_gbps) * 1e9) : 0;
  }
  s.microbatches =
      std::max<int64_t>(1, t.global_batch_size / (t.micro_batch_size * std::max<int64_t>(1, l.dp)));
  // Communication hidden behind compute (hardware.comm_overlap) is not on the critical path.
  const double hidden = std::min(c.hardware.comm_overlap * (s.tp_s + s.ep_s), s.compute_s + s.recompute_s);
  s.hidden_s = hidden;
  const double busy = s.compute_s + s.recompute_s + s.tp_s + s.ep_s - hidden;
  s.bubble_s = l.pp > 1 ? busy * double(l.pp - 1) / double(l.virtual_stages * s.microbatches) : 0;
  s.step_s = busy + s.bubble_s + s.dp_s;
  s.tokens_per_s = tokens / s.step_s;
  s.mfu = tokens * f.total() / (s.step_s * gpus * hw.peak_tflops * 1e12);
  return s;
}

std::string StepCost::text() const {
  auto sec = [](double v) { return fixed(v, v < 1 ? 3 : 2); };
  return "step " + sec(step_s) + " s = compute " + sec(compute_s) + " + recompute " + sec(recompute_s) +
         " + TP " + sec(tp_s) + (tp_inside_node ? "" : " (across nodes)") + " + EP " + sec(ep_s) +
         (ep_inside_node ? " (NVLink)" : " (InfiniBand)") + " + bubble " + sec(bubble_s) + " + DP " +
         sec(dp_s) + (hidden_s > 0 ? " - overlapped " + sec(hidden_s) : std::string()) + "; " +
         fixed(tokens_per_s, 0) + " tokens/s, MFU " + fixed(100 * mfu, 1) + "%";
}

}  // namespace dsv3
