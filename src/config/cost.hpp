// Step-time model of a layout: compute from FLOPs at an assumed MFU, the FLOPs a recompute policy
// adds, tensor-parallel collectives, expert-parallel all-to-all and data-parallel gradient traffic
// over the bandwidths of the hardware, and the pipeline bubble of (interleaved) 1F1B. The planner
// ranks layouts by it; every term is printed so a user can check the reasoning.
#pragma once

#include <string>
#include <vector>

#include "config/config.hpp"

namespace dsv3 {

// Per-GPU numbers of a GPU type (dense, no sparsity; link bandwidths one direction).
struct HardwareSpec {
  std::string gpu;            // the name the defaults were taken for
  double peak_tflops = 989;   // dense bf16
  double fp8_factor = 2;      // FP8 GEMM rate over bf16
  double nvlink_gbps = 450;   // GB/s per GPU inside an NVLink domain
  double ib_gbps = 50;        // GB/s per GPU across domains (one NIC per GPU)
  int64_t gpus_per_node = 8;  // GPUs of one NVLink domain
  double hbm_gbps = 3350;     // memory bandwidth, for the elementwise rebuilds of recompute
  std::string source;
};
// The defaults of hardware.gpu_type (H100, H800, H200, GB200; others take H100's, said in source),
// overridden by the config's hardware.peak_tflops, nvlink_gbps, ib_gbps and gpus_per_node.
HardwareSpec hardware_spec(const HardwareConfig& h);

// Forward FLOPs per token that the backward re-runs under a recompute set (0 for none; the
// elementwise rebuilds of norms and swiglu are memory-bound: recompute_bytes_per_token).
double recompute_flops_per_token(const ModelConfig& m, int64_t seq, const RecomputeSet& r);

// Bytes per token the elementwise rebuilds (norms, swiglu) read and write: the rebuilt tensors
// written and their inputs read once, over all layers (0 under none and full).
double recompute_bytes_per_token(const ModelConfig& m, const RecomputeSet& r, double elem_bytes);

struct StepCost {
  double compute_s = 0;    // training FLOPs / (GPUs x peak x MFU), FP8 GEMMs at fp8_factor
  double recompute_s = 0;  // the recompute policy's extra forward FLOPs, the same way
  double tp_s = 0;         // TP all-gathers / reduce-scatters (or all-reduces) of the hidden state
  double ep_s = 0;         // EP dispatch and combine, forward and backward
  double dp_s = 0;         // DP gradient reduce (+ parameter all-gather under ZeRO), after the backward
  double bubble_s = 0;     // pipeline bubble: (pp - 1) / (vp x micro-batches) of the busy time
  double hidden_s = 0;     // TP + EP time hidden behind compute (hardware.comm_overlap)
  double step_s = 0;       // all of it, less hidden_s
  double tokens_per_s = 0, mfu = 0;
  bool tp_inside_node = true, ep_inside_node = true;
  int64_t microbatches = 1;  // per DP rank per step
  std::string text() const;  // one line: "step 12.3 s = compute 9.1 + recompute 0.4 + ..."
};
StepCost step_cost(const Config& c, const Layout& l, const RecomputeSet& r, const HardwareSpec& hw);

}  // namespace dsv3
