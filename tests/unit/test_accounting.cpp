// Accounting: exact parameter counts for the published 671B model, every seed size inside its band,
// FLOPs per token by hand, and a memory model that behaves monotonically in ZeRO stage, DP and
// recompute.
#include <gtest/gtest.h>

#include <cmath>

#include "config/accounting.hpp"
#include "config/config.hpp"
#include "core/tensor.hpp"

using namespace dsv3;

namespace {
Config load(const char* name) { return load_config(resolve_config_path(name)); }
}  // namespace

TEST(Accounting, PublishedMLAPerLayer) {
  // Hand count from the published shapes: q_a 7168x1536, q_a_layernorm 1536, q_b 1536x(128*192),
  // kv_a_proj_with_mqa 7168x576, kv_a_layernorm 512, kv_b 512x(128*256), o 16384x7168.
  const int64_t expected =
      7168LL * 1536 + 1536 + 1536LL * 128 * 192 + 7168LL * 576 + 512 + 512LL * 128 * 256 + 128LL * 128 * 7168;
  EXPECT_EQ(expected, 187107328);
  EXPECT_EQ(mla_params(load("671b").model), expected);
}

TEST(Accounting, Published671BTotals) {
  const ParamCounts p = count_parameters(load("671b").model);
  // Embedding and head 129280x7168 each; 61 MLA blocks; 3 dense FFNs of 18432; 58 MoE layers of
  // 256 routed + 1 shared experts of 2048 and a 256x7168 router; 2 norms per block + final norm.
  const int64_t emb = 129280LL * 7168;
  const int64_t expert = 3LL * 7168 * 2048;
  const int64_t expected_total = 2 * emb + 61LL * 187107328 + 3LL * 3 * 7168 * 18432 +
                                 58LL * (256 + 1) * expert + 58LL * 256 * 7168 + 61LL * 2 * 7168 + 7168;
  EXPECT_EQ(p.total(), expected_total);
  EXPECT_EQ(p.total(), 671026404352LL);
  EXPECT_NEAR(double(p.total()) / 671.0e9, 1.0, 0.005);  // "671B"
  EXPECT_GE(p.active(), 37.0e9);                         // "37B activated"
  EXPECT_LE(p.active(), 38.0e9);
  EXPECT_EQ(p.active(), 37552282624LL);
  // The MTP module: about 11.6B of its own; about 14B with its copies of embedding and head (the
  // released files hold 685B in all).
  EXPECT_NEAR(double(p.mtp.total) / 11.6e9, 1.0, 0.01);
  EXPECT_NEAR(double(p.total_with_mtp() + 2 * emb) / 685e9, 1.0, 0.005);
}

TEST(Accounting, SeedSizesWithinBand) {
  struct Band {
    const char* name;
    double total, active;
  };
  for (const Band b : {Band{"1b", 1.0e9, 0.3e9}, Band{"5b", 5.0e9, 1.5e9}, Band{"10b", 10e9, 3e9},
                       Band{"15b", 15e9, 4.5e9}, Band{"20b", 20e9, 6e9}}) {
    const ParamCounts p = count_parameters(load(b.name).model);
    EXPECT_NEAR(double(p.total()) / b.total, 1.0, 0.15) << b.name << " total " << p.total();
    EXPECT_NEAR(double(p.active()) / b.active, 1.0, 0.15) << b.name << " active " << p.active();
  }
}

TEST(Accounting, ComponentsSumAndActiveSubset) {
  for (const char* n : {"tiny", "1b", "5b", "10b", "15b", "20b", "671b"}) {
    const ParamCounts p = count_parameters(load(n).model);
    int64_t sum = 0;
    for (const auto& [name, v] : p.rows()) {
      EXPECT_LE(v.active, v.total) << n << " " << name;
      if (name.rfind("MTP", 0) != 0) sum += v.total;
    }
    EXPECT_EQ(sum, p.total()) << n;
    EXPECT_LT(p.active(), p.total()) << n;
  }
}

TEST(Accounting, FlopsPerTokenByHand) {
  const Config c = load("tiny");
  const auto& m = c.model;
  const int64_t S = c.training.seq_length;
  const FlopsPerToken f = training_flops_per_token(m, S);
  // Attention: 3 (fwd+bwd) x 2 x H x (qk + v) x (S+1)/2 per layer, MTP block included.
  const double att = 3.0 * 2 * m.num_heads * (m.qk_head_dim() + m.mla.v_head_dim) * (S + 1) / 2.0 *
                     (m.num_layers + m.mtp.depth);
  EXPECT_DOUBLE_EQ(f.attention, att);
  // Matmul: 6 x weights touched (active parameters less the embedding lookup and norm weights, plus
  // the MTP module's eh_proj, block and the head once more).
  const ParamCounts p = count_parameters(m);
  const double latent_norms = double(m.num_layers) * (m.mla.d_latent + m.mla.q_lora_rank);
  const double main = double(p.active() - p.embedding.active - p.norms.active) - latent_norms;
  const double mtp = double(p.mtp.active) - 3.0 * m.d_model - 2.0 * m.d_model -
                     (m.mla.d_latent + m.mla.q_lora_rank) + double(m.vocab_size) * m.d_model;
  EXPECT_NEAR(f.matmul, 6.0 * (main + mtp), 1.0);
  EXPECT_GT(training_flops_per_token(m, 2 * S).total(), f.total());
}

TEST(Accounting, StagesPartitionLayers) {
  for (int64_t L : {4, 16, 61})
    for (int64_t pp : {1, 2, 3, 4, 8})
      for (int64_t last : {0, 1, 3}) {
        if (pp > L || (last > 0 && (pp == 1 || L - last < pp - 1))) continue;
        int64_t sum = 0;
        for (int64_t s = 0; s < pp; ++s) {
          EXPECT_EQ(first_layer_of_stage(L, pp, s, last), sum);
          sum += layers_in_stage(L, pp, s, last);
          EXPECT_GE(layers_in_stage(L, pp, s, last), 1);
        }
        EXPECT_EQ(sum, L);
        if (last > 0) {
          EXPECT_EQ(layers_in_stage(L, pp, pp - 1, last), last);
        }
      }
  // 61 layers, last stage 1, 16 stages: the other 15 stages split 60 layers, 4 each.
  EXPECT_EQ(layers_in_stage(61, 16, 0, 1), 4);
  EXPECT_EQ(first_layer_of_stage(61, 16, 15, 1), 60);
}

TEST(Accounting, MemoryMonotonicInZeroStageAndDP) {
  const Config c = load("10b");
  const MemoryOptions o = MemoryOptions::from(c);
  for (int64_t dp : {1, 2, 4, 8}) {
    double prev = 1e300;
    for (int64_t z : {0, 1, 2}) {
      Layout l = resolve_layout(c, 4 * dp);
      l.zero_stage = z;
      const double m = memory_per_gpu(c, l, o).total();
      if (dp == 1) {
        EXPECT_DOUBLE_EQ(m, prev == 1e300 ? m : prev) << "ZeRO changes nothing at dp=1";
      } else {
        EXPECT_LT(m, prev) << "dp=" << dp << " zero=" << z;
      }
      prev = m;
    }
  }
  for (int64_t z : {1, 2}) {
    double prev = 1e300;
    for (int64_t dp : {1, 2, 4, 8, 16}) {
      Layout l = resolve_layout(c, 4 * dp);
      l.zero_stage = z;
      const auto m = memory_per_gpu(c, l, o);
      EXPECT_LT(m.optimizer, prev) << "zero=" << z << " dp=" << dp;
      prev = m.optimizer;
    }
  }
  Layout l0 = resolve_layout(c, 8);
  l0.zero_stage = 0;
  Layout l0b = resolve_layout(c, 16);
  l0b.zero_stage = 0;
  EXPECT_DOUBLE_EQ(memory_per_gpu(c, l0, o).weights + memory_per_gpu(c, l0, o).optimizer,
                   memory_per_gpu(c, l0b, o).weights + memory_per_gpu(c, l0b, o).optimizer);
}

TEST(Accounting, MemoryMonotonicInRecomputeAndSplits) {
  const Config c = load("10b");
  MemoryOptions o = MemoryOptions::from(c);
  const Layout l = resolve_layout(c, 16);
  double prev = 1e300;
  for (const char* rc : {"none", "selective", "full"}) {
    o.recompute = rc;
    const double a = memory_per_gpu(c, l, o).activations;
    EXPECT_LT(a, prev) << rc;
    prev = a;
  }
  o = MemoryOptions::from(c);
  Layout tp1 = l, tp2 = l;
  tp1.tp = 1, tp1.dp = 8;
  tp2.tp = 2, tp2.dp = 4;
  EXPECT_LT(memory_per_gpu(c, tp2, o).weights, memory_per_gpu(c, tp1, o).weights);
  Layout ep1 = l, ep4 = l;
  ep1.ep = 1, ep4.ep = 4;
  EXPECT_LT(memory_per_gpu(c, ep4, o).weights, memory_per_gpu(c, ep1, o).weights);
  // Weights of the busiest rank times the ranks holding distinct shards cover the model.
  Layout one;
  const Config tiny = load("tiny");
  const auto m1 = memory_per_gpu(tiny, one, MemoryOptions::from(tiny));
  const ParamCounts pc = count_parameters(tiny.model);
  EXPECT_EQ(m1.params_on_rank, pc.total_with_mtp());
}

// The count of bytes the tensors hold, which the memory check prints beside the resident set.
TEST(Accounting, HostBufferStatsCountLiveAndPeakBytes) {
  const HostBufferStats before = host_buffer_stats();
  reset_host_buffer_peak();
  {
    OwnedTensor a(DType::F32, {1000}, "a");  // 4000 B, rounded to 4032
    EXPECT_EQ(host_buffer_stats().live - before.live, 4032);
    {
      OwnedTensor b(DType::BF16, {7}, "b");  // 14 B, rounded to 64
      EXPECT_EQ(host_buffer_stats().live - before.live, 4096);
    }
    EXPECT_EQ(host_buffer_stats().live - before.live, 4032);
    OwnedTensor moved = std::move(a);
    EXPECT_EQ(host_buffer_stats().live - before.live, 4032);
  }
  EXPECT_EQ(host_buffer_stats().live, before.live);
  EXPECT_EQ(host_buffer_stats().peak - before.live, 4096);
}

// The host's FP8 GEMM workspace: a routed expert takes each token at most once from each EP rank, so
// its GEMM rows grow with min(top-k, EP), not with top-k alone.
TEST(Accounting, HostFp8ExpertGemmRowsBoundedByEp) {
  Config c = load("tiny");
  c.model.moe.expert_dim = 2048;  // the routed experts' GEMMs are the largest
  c.model.moe.num_shared_experts = 0;
  MemoryOptions fp8 = MemoryOptions::from(c);
  fp8.host = true, fp8.fp8 = true, fp8.precision = "bf16";
  MemoryOptions plain = fp8;
  plain.fp8 = false;
  // What FP8 adds to the workspace per token.
  auto fp8_part = [&](const ModelConfig& m, const Layout& l) {
    return host_workspace_bytes_per_token(m, l, fp8, 2.0) - host_workspace_bytes_per_token(m, l, plain, 2.0);
  };
  const double d = c.model.d_model, f = c.model.moe.expert_dim;
  // The largest scratch is the up projection's Fprop (K = d, N = f: decoded x, accumulator and
  // partials) or equally the down projection's Dgrad; beside it, the codes of the largest Wgrad
  // (E4M3 codes of dy and x, one byte per element of each).
  const double one_row = (4 * d + 8 * f) + (d + f);
  Layout one, ep2;
  ep2.ep = 2, ep2.dp = 2;
  for (int64_t k : {2, 4}) {
    c.model.moe.num_experts_per_token = k;
    EXPECT_DOUBLE_EQ(fp8_part(c.model, one), one_row) << "top-" << k;
    EXPECT_DOUBLE_EQ(fp8_part(c.model, ep2), 2 * one_row) << "top-" << k;
  }
  c.model.moe.num_experts_per_token = 1;
  EXPECT_DOUBLE_EQ(fp8_part(c.model, ep2), one_row);
}
