// Model-level behaviour on the tiny config: bad input is reported with the tensor named, recompute
// modes give the same bits, capacity dropping is counted and passes dropped tokens through the
// residual only, and the aux-loss-free bias update follows the published rule.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <random>

#include "config/accounting.hpp"
#include "config/config.hpp"
#include "core/error.hpp"
#include "model/init.hpp"
#include "model/model.hpp"

using namespace dsv3;

namespace {
Config tiny(std::vector<std::string> overrides = {}) {
  return load_config(resolve_config_path("tiny"), overrides);
}
OwnedTensor random_tokens(const Config& c, int64_t B, int64_t S, uint64_t seed = 7) {
  OwnedTensor t(DType::I32, {B, S + c.model.mtp.depth + 1}, "tokens");
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> u(0, static_cast<int32_t>(c.model.vocab_size - 1));
  for (int64_t i = 0; i < t.t.numel(); ++i) t.i32()[i] = u(rng);
  return t;
}
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Model, RegistersEveryParameterOnceWithHFNames) {
  const Config c = tiny();
  Model m(c);
  const auto& ps = m.params();
  EXPECT_NE(ps.find("model.embed_tokens.weight"), nullptr);
  EXPECT_NE(ps.find("lm_head.weight"), nullptr);
  EXPECT_NE(ps.find("model.layers.0.mlp.gate_proj.weight"), nullptr);  // dense layer
  EXPECT_NE(ps.find("model.layers.1.mlp.experts.7.down_proj.weight"), nullptr);
  EXPECT_NE(ps.find("model.layers.1.mlp.shared_experts.up_proj.weight"), nullptr);
  EXPECT_NE(ps.find("model.layers.1.self_attn.q_a_layernorm.weight"), nullptr);
  EXPECT_NE(ps.find("model.layers.1.mlp.gate.e_score_correction_bias"), nullptr);
  EXPECT_NE(ps.find("model.layers.4.eh_proj.weight"), nullptr);  // MTP module at num_layers + k - 1
  EXPECT_NE(ps.find("model.layers.4.shared_head.norm.weight"), nullptr);
  EXPECT_EQ(ps.find("model.layers.1.self_attn.q_proj.weight"), nullptr);
  EXPECT_EQ(ps.find("model.layers.4.shared_head.head.weight"), nullptr);  // shared with lm_head
  EXPECT_EQ(ps.find("model.layers.1.mlp.experts.7.down_proj.weight")->shard.global_shape,
            (std::vector<int64_t>{c.model.d_model, c.model.moe.expert_dim}));
  int64_t n = 0;
  for (const auto& p : ps.params()) n += p.value.numel();
  EXPECT_EQ(n, count_parameters(c.model).total_with_mtp());
}

TEST(Model, BadInputNamesTheTensor) {
  const Config c = tiny();
  Model m(c);
  OwnedTensor tok = random_tokens(c, 2, 16);
  tok.i32()[5] = static_cast<int32_t>(c.model.vocab_size);
  const std::string e1 = error_of([&] { m.forward_backward(tok); });
  EXPECT_NE(e1.find("'tokens'[0, 5] = 264"), std::string::npos) << e1;
  EXPECT_NE(e1.find("vocabulary"), std::string::npos) << e1;
  OwnedTensor longer = random_tokens(c, 1, c.model.context_length + 1);
  const std::string e2 = error_of([&] { m.forward(longer); });
  EXPECT_NE(e2.find("longer than model.context_length = 512"), std::string::npos) << e2;
  OwnedTensor flat(DType::I32, {10}, "tokens");
  const std::string e3 = error_of([&] { m.forward(flat); });
  EXPECT_NE(e3.find("'tokens'"), std::string::npos) << e3;
  OwnedTensor short_row(DType::I32, {2, 2}, "tokens");
  EXPECT_NE(error_of([&] { m.forward(short_row); }).find("no full window"), std::string::npos);
}

TEST(Model, ForwardOnlyMatchesTrainingLosses) {
  const Config c = tiny();
  Model m(c);
  OwnedTensor tok = random_tokens(c, 2, 24);
  const StepLosses eval = m.forward(tok);
  const StepLosses train = m.forward_backward(tok);
  EXPECT_EQ(eval.total, train.total);
  EXPECT_EQ(eval.main, train.main);
  ASSERT_EQ(train.mtp.size(), 1u);
  EXPECT_GT(train.balance, 0);
  // Untrained model: losses near ln(V).
  EXPECT_NEAR(train.main, std::log(double(c.model.vocab_size)), 0.5);
}

TEST(Model, RecomputeModesGiveIdenticalBits) {
  OwnedTensor tok = random_tokens(tiny(), 2, 20);
  std::vector<float> ref;
  double ref_loss = 0;
  // Every policy, and every module of selective on its own (each rebuilds different tensors).
  for (const std::string mode : {"none", "selective", "full", "selective:norms", "selective:mla_up_proj",
                                 "selective:swiglu", "selective:mla_up_proj,swiglu"}) {
    const auto colon = mode.find(':');
    std::vector<std::string> o = {"training.recompute=" + mode.substr(0, colon)};
    if (colon != std::string::npos)
      o.push_back("training.recompute_modules=[" + mode.substr(colon + 1) + "]");
    Model m(tiny(o));
    const StepLosses l = m.forward_backward(tok);
    const Tensor g = m.params().flat_grads();
    std::vector<float> v(g.f32(), g.f32() + g.numel());
    if (ref.empty()) {
      ref = v, ref_loss = l.total;
      continue;
    }
    EXPECT_EQ(l.total, ref_loss) << mode;
    EXPECT_EQ(std::memcmp(v.data(), ref.data(), v.size() * 4), 0) << mode << " changed the gradient bits";
  }
}

TEST(Model, GradientsAccumulateAcrossMicroBatches) {
  const Config c = tiny();
  Model a(c), b(c);
  OwnedTensor t1 = random_tokens(c, 1, 16, 1), t2 = random_tokens(c, 1, 16, 2);
  a.forward_backward(t1, 0.5f);
  a.forward_backward(t2, 0.5f);
  b.forward_backward(t1, 1.0f);
  const Tensor ga = a.params().flat_grads(), gb = b.params().flat_grads();
  double diff = 0;
  for (int64_t i = 0; i < ga.numel(); ++i) diff += std::fabs(ga.f32()[i] - 0.5 * gb.f32()[i]);
  EXPECT_GT(diff, 1e-6) << "the second micro-batch added nothing";
}

TEST(Model, CapacityFactorDropsAndCounts) {
  // capacity_factor 1 with a skewed router: some assignments must be dropped, and the count reported.
  Model m(tiny({"model.moe.capacity_factor=1.0"}));
  const Config c = tiny();
  for (const auto& st : m.params().states()) {  // push every token towards expert 0 of each layer
    st.value.f32()[0] = 10.0f;
    st.value.f32()[1] = 10.0f;
  }
  OwnedTensor tok = random_tokens(c, 2, 32);
  const StepLosses l = m.forward_backward(tok);
  EXPECT_GT(l.dropped, 0);
  EXPECT_LT(l.dropped, l.assignments);
  for (const auto& [layer, load] : l.expert_load) {
    const int64_t cap = static_cast<int64_t>(
        std::ceil(1.0 * 64 * c.model.moe.num_experts_per_token / c.model.moe.num_experts));
    for (int64_t n : load) EXPECT_LE(n, cap) << "layer " << layer;
  }
  Model free_model(c);
  EXPECT_EQ(free_model.forward_backward(tok).dropped, 0);
}

TEST(Model, RouterBiasUpdateRule) {
  const Config c = tiny();
  Model m(c);
  const float gamma = static_cast<float>(c.model.moe.bias_update_speed);
  std::map<int64_t, std::vector<int64_t>> load;
  load[1] = {10, 2, 6, 6, 6, 6, 6, 6};  // mean 6
  m.update_router_bias(load);
  const Tensor b = m.router_bias(1);
  EXPECT_FLOAT_EQ(b.f32()[0], -gamma);               // overloaded: down
  EXPECT_FLOAT_EQ(b.f32()[1], gamma);                // underloaded: up
  EXPECT_FLOAT_EQ(b.f32()[2], 0.0f);                 // at the mean: unchanged
  EXPECT_FLOAT_EQ(m.router_bias(2).f32()[0], 0.0f);  // other layers untouched
  EXPECT_TRUE(m.router_bias(0).empty());             // dense layer: no bias
  load[1] = {1, 2};
  EXPECT_THROW(m.update_router_bias(load), Error);
}

TEST(Init, GeneratorMatchesTheReferenceConstants) {
  // Constants printed by tests/reference/check_reference.py (its check (d)).
  EXPECT_EQ(splitmix64(0), 0xe220a8397b1dcdafULL);
  EXPECT_EQ(fnv1a64("a"), 0xaf63dc4c8601ec8cULL);
  EXPECT_EQ(fnv1a64("model.embed_tokens.weight"), 0xa88fd795d5c6d156ULL);
  OwnedTensor t(DType::F32, {4}, "w");
  init_normal_tensor(t, 1234, "model.embed_tokens.weight", 0.02);
  const uint32_t expected[] = {0xbca89918u, 0xbc7a46e4u, 0xbc5920a5u, 0x3cebcfceu};
  for (int i = 0; i < 4; ++i) {
    uint32_t bits;
    std::memcpy(&bits, t.f32() + i, 4);
    EXPECT_EQ(bits, expected[i]) << "element " << i;
  }
  // A shard initialises its slice exactly as the full tensor does.
  OwnedTensor full(DType::F32, {6, 5}, "full"), rows(DType::F32, {2, 5}, "rows");
  init_normal_tensor(full, 9, "x", 1.0);
  init_normal_tensor(rows, 9, "x", 1.0, /*first_index=*/3 * 5);
  EXPECT_EQ(std::memcmp(rows.f32(), full.f32() + 15, 10 * 4), 0);
}
