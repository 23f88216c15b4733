// Config loading: the shipped configs carry the seed's values, and every validation error names the
// file, the key (with its line) and the reason.
#include <gtest/gtest.h>

#include <string>

#include "config/config.hpp"
#include "core/error.hpp"

using dsv3::Config;
using dsv3::load_config;
using dsv3::load_config_from_string;
using dsv3::recompute_set;
using dsv3::resolve_config_path;

namespace {

const char* kMinimal = R"(name: t
model:
  vocab_size: 256
  d_model: 64
  num_layers: 4
  num_dense_layers: 1
  num_heads: 4
  ffn_dim: 128
  context_length: 256
  mla:
    d_latent: 16
    q_lora_rank: 32
    qk_nope_head_dim: 16
    qk_rope_head_dim: 8
    v_head_dim: 16
  moe:
    num_experts: 8
    num_experts_per_token: 2
    num_shared_experts: 1
    expert_dim: 32
    num_groups: 4
    topk_groups: 2
training:
  seq_length: 64
  global_batch_size: 8
  micro_batch_size: 2
)";

// Loads kMinimal with overrides and returns the error message ("" if it loaded).
std::string error_of(const std::vector<std::string>& overrides, const std::string& yaml = kMinimal) {
  try {
    load_config_from_string(yaml, "t.yaml", overrides);
  } catch (const dsv3::Error& e) {
    return e.what();
  }
  return "";
}

::testing::AssertionResult Mentions(const std::string& msg, std::initializer_list<const char*> parts) {
  if (msg.empty()) return ::testing::AssertionFailure() << "no error was raised";
  for (const char* p : parts)
    if (msg.find(p) == std::string::npos)
      return ::testing::AssertionFailure() << "'" << msg << "' lacks '" << p << "'";
  return ::testing::AssertionSuccess();
}

std::string replace(std::string s, const std::string& from, const std::string& to) {
  const auto pos = s.find(from);
  EXPECT_NE(pos, std::string::npos) << from;
  return pos == std::string::npos ? s : s.replace(pos, from.size(), to);
}

}  // namespace

TEST(Config, MinimalLoadsWithDefaults) {
  const Config c = load_config_from_string(kMinimal, "t.yaml");
  EXPECT_EQ(c.model.d_model, 64);
  EXPECT_EQ(c.model.moe.score_func, "sigmoid");
  EXPECT_EQ(c.parallel.tp, 1);
  EXPECT_EQ(c.training.optimizer.beta2, 0.95);
  EXPECT_EQ(c.lines.at("model.d_model"), 4);
}

TEST(Config, UnknownKeyNamesFileLineAndSuggestion) {
  const std::string yaml = replace(kMinimal, "  ffn_dim: 128\n", "  ffn_dims: 128\n");
  EXPECT_TRUE(Mentions(error_of({}, yaml), {"t.yaml:8", "unknown key 'model.ffn_dims'", "model.ffn_dim"}));
  const std::string top = std::string(kMinimal) + "trainig:\n  seed: 1\n";
  EXPECT_TRUE(Mentions(error_of({}, top), {"t.yaml:27", "unknown key 'trainig'"}));
}

TEST(Config, WrongTypeNamesLine) {
  const std::string yaml = replace(kMinimal, "num_heads: 4", "num_heads: four");
  EXPECT_TRUE(Mentions(error_of({}, yaml), {"t.yaml:7", "model.num_heads", "an integer", "'four'"}));
  const std::string frac = replace(kMinimal, "num_layers: 4", "num_layers: 4.5");
  EXPECT_TRUE(Mentions(error_of({}, frac), {"t.yaml:5", "model.num_layers", "an integer"}));
  const std::string b = std::string(kMinimal) + "parallel:\n  sequence_parallel: maybe\n";
  EXPECT_TRUE(Mentions(error_of({}, b), {"parallel.sequence_parallel", "true or false", "'maybe'"}));
  const std::string map = replace(kMinimal, "  vocab_size: 256\n", "  vocab_size:\n    a: 1\n");
  EXPECT_TRUE(Mentions(error_of({}, map), {"model.vocab_size", "got a mapping"}));
}

TEST(Config, MissingRequiredKey) {
  const std::string yaml = replace(kMinimal, "  d_model: 64\n", "");
  EXPECT_TRUE(Mentions(error_of({}, yaml), {"t.yaml", "missing required key 'model.d_model'"}));
}

TEST(Config, SyntaxError) {
  EXPECT_TRUE(Mentions(error_of({}, "name: t\nmodel: [1, 2\n"), {"t.yaml", "YAML syntax error"}));
}

TEST(Config, ImpossibleValues) {
  EXPECT_TRUE(Mentions(error_of({"model.d_model=-4"}), {"model.d_model", "must be positive"}));
  EXPECT_TRUE(
      Mentions(error_of({"model.moe.score_func=tanh"}), {"model.moe.score_func", "sigmoid", "'tanh'"}));
  EXPECT_TRUE(Mentions(error_of({"parallel.zero_stage=3"}), {"parallel.zero_stage", "0, 1 or 2"}));
  EXPECT_TRUE(Mentions(error_of({"model.mla.qk_rope_head_dim=7"}), {"qk_rope_head_dim", "even"}));
  EXPECT_TRUE(Mentions(error_of({"training.recompute=some"}), {"training.recompute", "selective"}));
  EXPECT_TRUE(Mentions(error_of({"training.recompute=selective", "training.recompute_modules=[norms, attn]"}),
                       {"training.recompute_modules", "unknown module 'attn'", "mla_up_proj"}));
  EXPECT_TRUE(Mentions(error_of({"training.recompute=full", "training.recompute_modules=[norms]"}),
                       {"training.recompute_modules", "needs training.recompute: selective", "full"}));
  EXPECT_TRUE(
      Mentions(error_of({"training.recompute=selective", "training.recompute_modules=[swiglu, swiglu]"}),
               {"training.recompute_modules", "'swiglu' is listed twice"}));
  EXPECT_TRUE(
      Mentions(error_of({"training.recompute_modules={a: 1}"}), {"training.recompute_modules", "list"}));
  EXPECT_TRUE(Mentions(error_of({"parallel.order=tp-ep-dp"}), {"parallel.order", "must name"}));
  EXPECT_TRUE(Mentions(error_of({"training.optimizer.moment_dtype=fp8"}),
                       {"training.optimizer.moment_dtype", "bf16", "'fp8'"}));
  const std::vector<std::string> fp8 = {"training.precision=bf16", "training.use_fp8=true"};
  const auto with_fp8 = [&](const std::string& extra) {
    std::vector<std::string> o = fp8;
    o.push_back(extra);
    return o;
  };
  EXPECT_TRUE(Mentions(error_of({"training.precision=bf16", "training.fp8_passes=[fprop]"}),
                       {"training.fp8_passes", "needs training.use_fp8: true"}));
  EXPECT_TRUE(Mentions(error_of(with_fp8("training.fp8_passes=[fprop, bprop]")),
                       {"training.fp8_passes", "unknown pass 'bprop'", "wgrad"}));
  EXPECT_TRUE(Mentions(error_of(with_fp8("training.fp8_passes=[dgrad, dgrad]")),
                       {"training.fp8_passes", "'dgrad' is listed twice"}));
  EXPECT_TRUE(Mentions(error_of(with_fp8("training.fp8_passes=[]")),
                       {"training.fp8_passes", "empty list", "training.use_fp8: false"}));
  EXPECT_TRUE(Mentions(error_of({"training.precision=bf16", "training.fp8_modules=[ffn]"}),
                       {"training.fp8_modules", "FP8 modules needs training.use_fp8: true"}));
  EXPECT_TRUE(Mentions(error_of(with_fp8("training.fp8_modules=[attention, router]")),
                       {"training.fp8_modules", "unknown module 'router'", "(known: attention, ffn)"}));
  EXPECT_TRUE(Mentions(error_of(with_fp8("training.fp8_modules=[ffn, ffn]")),
                       {"training.fp8_modules", "'ffn' is listed twice"}));
  EXPECT_TRUE(Mentions(error_of(with_fp8("training.fp8_modules=[]")),
                       {"training.fp8_modules", "empty list", "training.use_fp8: false"}));
  EXPECT_TRUE(Mentions(error_of({"training.precision=bf16", "training.fp8_operands=[weights]"}),
                       {"training.fp8_operands", "FP8 operands needs training.use_fp8: true"}));
  EXPECT_TRUE(
      Mentions(error_of(with_fp8("training.fp8_operands=[weights, scales]")),
               {"training.fp8_operands", "unknown operand 'scales'", "activations, weights, gradients"}));
  EXPECT_TRUE(Mentions(error_of(with_fp8("training.fp8_operands=[]")),
                       {"training.fp8_operands", "empty list", "training.use_fp8: false"}));
  // The FP8 caches hold activation codes: an ablation without quantized activations refuses them.
  for (const char* cache : {"model.mla.use_fp8_kv", "model.moe.deep_ep_fp8"}) {
    std::vector<std::string> without = with_fp8("training.fp8_operands=[weights, gradients]");
    without.push_back(std::string(cache) + "=true");
    EXPECT_TRUE(Mentions(error_of(without), {"training.fp8_operands", "without activations", cache}));
    std::vector<std::string> with = with_fp8("training.fp8_operands=[activations, weights]");
    with.push_back(std::string(cache) + "=true");
    EXPECT_NO_THROW(load_config(resolve_config_path("tiny"), with)) << cache;
    std::vector<std::string> sr = with_fp8("training.fp8_rounding=stochastic");
    sr.push_back(std::string(cache) + "=true");
    EXPECT_TRUE(Mentions(error_of(sr), {"training.fp8_rounding", "stochastic needs", cache, "false"}));
  }
  EXPECT_TRUE(Mentions(error_of(with_fp8("training.fp8_rounding=up")),
                       {"training.fp8_rounding", "nearest", "stochastic", "'up'"}));
  EXPECT_TRUE(Mentions(error_of({"training.precision=bf16", "training.fp8_rounding=stochastic"}),
                       {"training.fp8_rounding", "needs training.use_fp8: true"}));
}

TEST(Config, RecomputeModulesReadAsAListOrCommaText) {
  const Config d = load_config(resolve_config_path("tiny"), {"training.recompute=selective"});
  EXPECT_EQ(recompute_set(d.training).text(), "selective (norms, mla_up_proj, swiglu)");
  const Config l = load_config(resolve_config_path("tiny"), {"training.recompute=selective",
                                                             "training.recompute_modules=[swiglu, norms]"});
  EXPECT_EQ(l.training.recompute_modules, (std::vector<std::string>{"swiglu", "norms"}));
  EXPECT_EQ(recompute_set(l.training).text(), "selective (norms, swiglu)");
  const Config t = load_config(resolve_config_path("tiny"),
                               {"training.recompute=selective", "training.recompute_modules=mla_up_proj"});
  EXPECT_EQ(recompute_set(t.training).text(), "selective (mla_up_proj)");
  EXPECT_EQ(
      recompute_set(load_config(resolve_config_path("tiny"), {"training.recompute=full"}).training).text(),
      "full");
  EXPECT_FALSE(recompute_set(load_config(resolve_config_path("tiny")).training).any());
}

TEST(Config, CrossFieldValidation) {
  EXPECT_TRUE(Mentions(error_of({"parallel.tp=3"}), {"tp=3", "model.num_heads=4"}));
  EXPECT_TRUE(Mentions(error_of({"parallel.ep=3"}), {"ep=3", "num_experts=8"}));
  EXPECT_TRUE(Mentions(error_of({"model.moe.num_groups=3"}),
                       {"model.moe.num_groups", "8 experts", "3 equal groups"}));
  EXPECT_TRUE(
      Mentions(error_of({"model.moe.topk_groups=5"}), {"model.moe.topk_groups", "(5)", "num_groups (4)"}));
  EXPECT_TRUE(Mentions(error_of({"model.moe.num_experts_per_token=5"}),
                       {"num_experts_per_token", "(5)", "reachable", "(4)"}));
  EXPECT_TRUE(Mentions(error_of({"parallel.pp=5"}), {"pp=5", "num_layers=4"}));
  EXPECT_TRUE(Mentions(error_of({"model.mla.d_latent=64"}), {"model.mla.d_latent", "(64)", "d_model (64)"}));
  EXPECT_TRUE(Mentions(error_of({"training.seq_length=512"}),
                       {"training.seq_length", "(512)", "context_length (256)"}));
  EXPECT_TRUE(Mentions(error_of({"parallel.dp=1", "parallel.ep=2"}), {"ep*expert_tp=2", "dp*tp=1"}));
  EXPECT_TRUE(
      Mentions(error_of({"model.num_dense_layers=5"}), {"num_dense_layers", "(5)", "num_layers (4)"}));
  EXPECT_TRUE(
      Mentions(error_of({"training.global_batch_size=7"}), {"global_batch_size", "micro_batch_size"}));
}

TEST(Config, WorldSizeLayout) {
  const Config c = load_config_from_string(kMinimal, "t.yaml", {"parallel.tp=2", "parallel.ep=2"});
  const dsv3::Layout l = dsv3::resolve_layout(c, 4);
  EXPECT_EQ(l.dp, 2);
  EXPECT_EQ(l.expert_dp(), 2);
  try {
    dsv3::resolve_layout(c, 3);
    FAIL() << "world 3 with tp=2 accepted";
  } catch (const dsv3::Error& e) {
    EXPECT_TRUE(Mentions(e.what(), {"world size 3", "tp*pp=2*1"}));
  }
  const Config fixed_dp = load_config_from_string(kMinimal, "t.yaml", {"parallel.dp=2"});
  try {
    dsv3::resolve_layout(fixed_dp, 4);
    FAIL() << "world 4 != tp*pp*dp=2 accepted";
  } catch (const dsv3::Error& e) {
    EXPECT_TRUE(Mentions(e.what(), {"world size 4", "1*1*2 = 2"}));
  }
  // ep=2 with tp=1 needs dp*tp divisible by 2: world 1 is not.
  const Config ep2 = load_config_from_string(kMinimal, "t.yaml", {"parallel.ep=2"});
  EXPECT_THROW(dsv3::resolve_layout(ep2, 1), dsv3::Error);
  EXPECT_EQ(dsv3::resolve_layout(ep2, 2).dp, 2);
}

TEST(Config, VirtualPipelineStages) {
  EXPECT_TRUE(Mentions(error_of({"parallel.virtual_stages=0"}), {"parallel.virtual_stages", "0"}));
  EXPECT_TRUE(Mentions(error_of({"parallel.virtual_stages=2"}), {"virtual_stages=2", "pp > 1"}));
  EXPECT_TRUE(Mentions(error_of({"parallel.pp=2", "parallel.virtual_stages=3"}),
                       {"pp*virtual_stages=2*3", "num_layers=4"}));
  // The interleaved schedule needs the micro-batches per pipeline to be a multiple of pp: 12 / 2 = 6
  // micro-batches on one pipeline (world 2) are fine, 3 per pipeline with dp = 2 (world 4) are not.
  const Config c = load_config_from_string(
      kMinimal, "t.yaml", {"parallel.pp=2", "parallel.virtual_stages=2", "training.global_batch_size=12"});
  EXPECT_EQ(dsv3::resolve_layout(c, 2).virtual_stages, 2);
  try {
    dsv3::resolve_layout(c, 4);
    FAIL() << "3 micro-batches per pipeline accepted with pp=2 interleaving";
  } catch (const dsv3::Error& e) {
    EXPECT_TRUE(Mentions(e.what(), {"interleaved", "= 3)", "multiple of pp=2"}));
  }
}

TEST(Config, LastStageLayers) {
  EXPECT_TRUE(Mentions(error_of({"parallel.last_stage_layers=1"}), {"last_stage_layers=1", "pp > 1"}));
  EXPECT_TRUE(Mentions(error_of({"parallel.pp=2", "parallel.last_stage_layers=4"}),
                       {"last_stage_layers=4", "leaves 0", "num_layers=4", "other 1 pipeline stages"}));
  const Config c =
      load_config_from_string(kMinimal, "t.yaml", {"parallel.pp=2", "parallel.last_stage_layers=1"});
  EXPECT_EQ(dsv3::resolve_layout(c, 2).last_stage_layers, 1);
}

TEST(Config, SetOverrides) {
  const Config c = load_config_from_string(
      kMinimal, "t.yaml",
      {"training.seq_length=128", "model.moe.score_func=softmax", "parallel.sequence_parallel=true",
       "training.optimizer.lr=1e-3", "checkpoint.dir=/tmp/x"});
  EXPECT_EQ(c.training.seq_length, 128);
  EXPECT_EQ(c.model.moe.score_func, "softmax");
  EXPECT_TRUE(c.parallel.sequence_parallel);
  EXPECT_DOUBLE_EQ(c.training.optimizer.lr, 1e-3);
  EXPECT_EQ(c.checkpoint.dir, "/tmp/x");
  EXPECT_EQ(c.lines.at("training.seq_length"), 0);
  EXPECT_NE(c.yaml_text.find("seq_length: 128"), std::string::npos);
  EXPECT_TRUE(Mentions(error_of({"model.moe.top_k=4"}), {"--set model.moe.top_k", "unknown key"}));
  EXPECT_TRUE(Mentions(error_of({"model.d_model"}), {"key=value"}));
  EXPECT_TRUE(Mentions(error_of({"model.d_model=abc"}), {"--set model.d_model", "an integer", "'abc'"}));
  EXPECT_TRUE(Mentions(error_of({"model.d_model.x=1"}), {"model.d_model", "not a section"}));
}

TEST(Config, MissingFile) {
  try {
    load_config("/nonexistent/dsv3.yaml");
    FAIL();
  } catch (const dsv3::Error& e) {
    EXPECT_TRUE(Mentions(e.what(), {"/nonexistent/dsv3.yaml", "cannot open"}));
  }
}

TEST(Config, NameResolution) {
  const std::string a = dsv3::resolve_config_path("1b");
  EXPECT_NE(a.find("deepseek_v3_1b.yaml"), std::string::npos);
  EXPECT_EQ(dsv3::resolve_config_path("deepseek_v3_1b"), a);
  EXPECT_NE(dsv3::resolve_config_path("671b").find("deepseek_v3_base.yaml"), std::string::npos);
  EXPECT_EQ(dsv3::resolve_config_path(a), a);
  EXPECT_THROW(dsv3::resolve_config_path("7b"), dsv3::Error);
  EXPECT_EQ(dsv3::list_config_paths().size(), 7u);
}

// The seed's quick-reference values (layers, hidden, KV latent, experts, top-k, vocab, context,
// shared experts, layout, GPUs, GPU memory).
struct SeedRow {
  const char* name;
  int64_t layers, hidden, latent, experts, topk, vocab, context, shared, tp, pp, ep, gpus_min, gpus_max;
  double gpu_mem;
};

TEST(Config, ShippedConfigsCarryTheSeedValues) {
  const SeedRow rows[] = {
      {"1b", 16, 1024, 256, 8, 2, 32768, 8192, 0, 1, 1, 1, 1, 2, 24},
      {"5b", 24, 2048, 512, 16, 2, 65536, 16384, 0, 2, 1, 1, 4, 8, 40},
      {"10b", 32, 3072, 768, 32, 4, 102400, 32768, 0, 2, 2, 2, 8, 16, 80},
      {"15b", 40, 3584, 896, 64, 4, 102400, 65536, 2, 4, 2, 2, 16, 24, 80},
      {"20b", 48, 4096, 1024, 96, 6, 131072, 65536, 2, 4, 2, 2, 24, 32, 80},
      {"671b", 61, 7168, 512, 256, 8, 129280, 131072, 1, 4, 4, 2, 32, 0, 80},
  };
  for (const auto& r : rows) {
    SCOPED_TRACE(r.name);
    const Config c = load_config(dsv3::resolve_config_path(r.name));
    EXPECT_EQ(c.model.num_layers, r.layers);
    EXPECT_EQ(c.model.d_model, r.hidden);
    EXPECT_EQ(c.model.mla.d_latent, r.latent);
    if (std::string(r.name) != "671b") {
      EXPECT_EQ(c.model.mla.d_latent * 4, c.model.d_model);
    }
    EXPECT_EQ(c.model.moe.num_experts, r.experts);
    EXPECT_EQ(c.model.moe.num_experts_per_token, r.topk);
    EXPECT_EQ(c.model.vocab_size, r.vocab);
    EXPECT_EQ(c.model.context_length, r.context);
    EXPECT_EQ(c.model.moe.num_shared_experts, r.shared);
    EXPECT_EQ(c.parallel.tp, r.tp);
    EXPECT_EQ(c.parallel.pp, r.pp);
    EXPECT_EQ(c.parallel.ep, r.ep);
    EXPECT_EQ(c.hardware.gpus_min, r.gpus_min);
    EXPECT_EQ(c.hardware.gpus_max, r.gpus_max);
    EXPECT_EQ(c.hardware.gpu_memory_gb, r.gpu_mem);
  }
}

TEST(Config, BaseIsThePublishedArchitecture) {
  const Config c = load_config(dsv3::resolve_config_path("671b"));
  const auto& m = c.model;
  EXPECT_EQ(m.vocab_size, 129280);
  EXPECT_EQ(m.d_model, 7168);
  EXPECT_EQ(m.ffn_dim, 18432);
  EXPECT_EQ(m.moe.expert_dim, 2048);
  EXPECT_EQ(m.num_layers, 61);
  EXPECT_EQ(m.num_dense_layers, 3);
  EXPECT_EQ(m.num_heads, 128);
  EXPECT_EQ(m.moe.num_groups, 8);
  EXPECT_EQ(m.moe.topk_groups, 4);
  EXPECT_DOUBLE_EQ(m.moe.route_scale, 2.5);
  EXPECT_EQ(m.moe.score_func, "sigmoid");
  EXPECT_EQ(m.mla.q_lora_rank, 1536);
  EXPECT_EQ(m.mla.qk_nope_head_dim, 128);
  EXPECT_EQ(m.mla.qk_rope_head_dim, 64);
  EXPECT_EQ(m.mla.v_head_dim, 128);
  EXPECT_DOUBLE_EQ(m.rope.factor, 40.0);
  EXPECT_EQ(m.rope.original_context_length, 4096);
  EXPECT_EQ(m.mtp.depth, 1);
  EXPECT_DOUBLE_EQ(m.norm_eps, 1e-6);
}

TEST(Config, TinyExercisesEveryFeature) {
  const Config c = load_config(dsv3::resolve_config_path("tiny"));
  const auto& m = c.model;
  EXPECT_GT(m.mla.q_lora_rank, 0);
  EXPECT_GT(m.num_dense_layers, 0);
  EXPECT_GT(m.num_moe_layers(), 0);
  EXPECT_GT(m.moe.num_groups, 1);
  EXPECT_LT(m.moe.topk_groups, m.moe.num_groups);
  EXPECT_GE(m.moe.num_shared_experts, 1);
  EXPECT_EQ(m.mtp.depth, 1);
  EXPECT_TRUE(m.yarn_active());
  EXPECT_TRUE(m.moe.aux_loss_free);
  EXPECT_GT(m.moe.seq_aux_alpha, 0);
  // Layouts the parallel tests use must divide it.
  for (const char* o : {"parallel.tp=2", "parallel.tp=4", "parallel.pp=2", "parallel.pp=4", "parallel.ep=2",
                        "parallel.ep=4", "parallel.ep=8"})
    EXPECT_NO_THROW(load_config(dsv3::resolve_config_path("tiny"), {o})) << o;
}
