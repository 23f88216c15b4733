// Mixed precision on the tiny config (MODEL.md, "Mixed precision"): bf16 and FP8 runs store what
// they say in the formats they say, stay close to fp32 without being fp32, give the same bits under
// every recompute mode, and impossible combinations are refused naming the key.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <random>

#include "config/config.hpp"
#include "core/error.hpp"
#include "core/lowp.hpp"
#include "model/model.hpp"

using namespace dsv3;

namespace {
const std::vector<std::string> kBf16 = {"training.precision=bf16"};
const std::vector<std::string> kFp8 = {"training.precision=bf16", "training.use_fp8=true"};
const std::vector<std::string> kFp8All = {"training.precision=bf16", "training.use_fp8=true",
                                          "model.mla.use_fp8_kv=true", "model.moe.deep_ep_fp8=true"};

Config tiny(std::vector<std::string> o, const std::string& extra = "") {
  if (!extra.empty()) o.push_back(extra);
  return load_config(resolve_config_path("tiny"), o);
}
OwnedTensor tokens(const Config& c, int64_t B, int64_t S, uint64_t seed = 3) {
  OwnedTensor t(DType::I32, {B, S + c.model.mtp.depth + 1}, "tokens");
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> u(0, static_cast<int32_t>(c.model.vocab_size - 1));
  for (int64_t i = 0; i < t.t.numel(); ++i) t.i32()[i] = u(rng);
  return t;
}
std::vector<float> grads(const Model& m) {
  const Tensor g = m.params().flat_grads();
  return {g.f32(), g.f32() + g.numel()};
}
double cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < a.size(); ++i)
    ab += double(a[i]) * b[i], aa += double(a[i]) * a[i], bb += double(b[i]) * b[i];
  return ab / std::sqrt(aa * bb);
}
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}
// The loss and gradient of tiny on `tok` under the settings `o`, plus key=list when list is not empty.
std::pair<double, std::vector<float>> loss_and_grads(const OwnedTensor& tok, std::vector<std::string> o,
                                                     const std::string& key, const std::string& list) {
  if (!list.empty()) o.push_back(key + "=" + list);
  Model m(tiny(o));
  const double loss = m.forward_backward(tok).total;
  return std::make_pair(loss, grads(m));
}
}  // namespace

TEST(Precision, RecomputeModesGiveIdenticalBitsInEveryPrecision) {
  for (const auto& prec : {kBf16, kFp8, kFp8All}) {
    const OwnedTensor tok = tokens(tiny(prec), 2, 20);
    std::vector<float> ref;
    double ref_loss = 0;
    for (const std::string mode : {"none", "selective", "full", "selective:norms", "selective:mla_up_proj"}) {
      const auto colon = mode.find(':');
      std::vector<std::string> o = prec;
      o.push_back("training.recompute=" + mode.substr(0, colon));
      if (colon != std::string::npos)
        o.push_back("training.recompute_modules=[" + mode.substr(colon + 1) + "]");
      Model m(tiny(o));
      const double loss = m.forward_backward(tok).total;
      const std::vector<float> g = grads(m);
      if (ref.empty()) {
        ref = g, ref_loss = loss;
        continue;
      }
      EXPECT_EQ(loss, ref_loss) << prec.back() << " " << mode;
      EXPECT_EQ(std::memcmp(g.data(), ref.data(), g.size() * 4), 0) << prec.back() << " " << mode;
    }
  }
}

TEST(Precision, EachPrecisionIsCloseToTheNextButNotEqual) {
  const OwnedTensor tok = tokens(tiny({}), 2, 24);
  std::vector<std::vector<float>> g;
  std::vector<double> loss;
  for (const auto& prec : {std::vector<std::string>{}, kBf16, kFp8, kFp8All}) {
    Model m(tiny(prec));
    loss.push_back(m.forward_backward(tok).total);
    g.push_back(grads(m));
  }
  const char* names[] = {"fp32", "bf16", "bf16+fp8", "bf16+fp8+kv+dispatch"};
  for (size_t i = 1; i < loss.size(); ++i) {
    // Under FP8 Fprop the KV cache and dispatch keep the codes the next GEMM quantizes anyway, so
    // they may leave the forward as it is (Fp8KvCache below); only their gradients must differ.
    if (i < 3) {
      EXPECT_NE(loss[i], loss[i - 1]) << names[i] << " computed the same loss as " << names[i - 1];
    }
    EXPECT_NE(std::memcmp(g[i].data(), g[i - 1].data(), g[i].size() * 4), 0)
        << names[i] << " computed the same gradient bits as " << names[i - 1];
    EXPECT_NEAR(loss[i], loss[0], 1e-2 * loss[0]) << names[i];
    const double c = cosine(g[i], g[0]);
    EXPECT_GT(c, 0.99) << names[i] << " gradient cosine with fp32";
    EXPECT_LT(c, 1.0 - 1e-9) << names[i] << " gradient equals fp32";
    std::printf("%-22s loss %.6f (fp32 %.6f), gradient cosine with fp32 %.6f\n", names[i], loss[i], loss[0],
                c);
  }
}

// training.fp8_passes: the forward of [dgrad, wgrad] is bf16's to the bit and that of [fprop] is
// FP8's; the gradients of every partial list differ from both bf16 and all-FP8, and listing all three
// passes is the default.
TEST(Precision, Fp8PassesPickWhichGemmsRunInFp8) {
  const OwnedTensor tok = tokens(tiny({}), 2, 24);
  const auto run = [&](const std::vector<std::string>& o, const std::string& passes) {
    return loss_and_grads(tok, o, "training.fp8_passes", passes);
  };
  const auto bf16 = run(kBf16, ""), all = run(kFp8, ""), listed = run(kFp8, "[wgrad, fprop, dgrad]");
  EXPECT_EQ(listed.first, all.first);
  EXPECT_TRUE(same_bits(listed.second, all.second));
  ASSERT_NE(all.first, bf16.first);
  for (const std::string passes : {"[fprop]", "[dgrad]", "[wgrad]", "[fprop, dgrad]", "[dgrad, wgrad]"}) {
    const auto r = run(kFp8, passes);
    const bool fprop = passes.find("fprop") != std::string::npos;
    EXPECT_EQ(r.first, fprop ? all.first : bf16.first) << passes;
    EXPECT_FALSE(same_bits(r.second, bf16.second)) << passes << " gave bf16's gradient";
    EXPECT_FALSE(same_bits(r.second, all.second)) << passes << " gave all-FP8's gradient";
  }
  EXPECT_EQ(precision_summary(tiny(kFp8, "training.fp8_passes=[fprop, wgrad]")),
            "bf16 + fp8 gemms (fprop, wgrad only)");
}

// training.fp8_modules: listing both projection kinds is the default, and each alone gives a loss and
// a gradient that differ from bf16's and from all-FP8's (so each kind has FP8 GEMMs of its own, and
// neither holds all of them).
TEST(Precision, Fp8ModulesPickWhichProjectionsRunInFp8) {
  const OwnedTensor tok = tokens(tiny({}), 2, 24);
  const auto run = [&](const std::vector<std::string>& o, const std::string& modules) {
    return loss_and_grads(tok, o, "training.fp8_modules", modules);
  };
  const auto bf16 = run(kBf16, ""), all = run(kFp8, ""), listed = run(kFp8, "[ffn, attention]");
  EXPECT_EQ(listed.first, all.first);
  EXPECT_TRUE(same_bits(listed.second, all.second));
  for (const std::string modules : {"[attention]", "[ffn]"}) {
    const auto r = run(kFp8, modules);
    EXPECT_NE(r.first, bf16.first) << modules << " gave bf16's loss";
    EXPECT_NE(r.first, all.first) << modules << " gave all-FP8's loss";
    EXPECT_FALSE(same_bits(r.second, bf16.second)) << modules << " gave bf16's gradient";
    EXPECT_FALSE(same_bits(r.second, all.second)) << modules << " gave all-FP8's gradient";
  }
  EXPECT_EQ(precision_summary(tiny(kFp8, "training.fp8_modules=[attention]")),
            "bf16 + fp8 gemms (attention only)");
  std::vector<std::string> ffn_fprop = kFp8;
  ffn_fprop.push_back("training.fp8_passes=[fprop]");
  EXPECT_EQ(precision_summary(tiny(ffn_fprop, "training.fp8_modules=[ffn]")),
            "bf16 + fp8 gemms (fprop; ffn only)");
}

namespace {
// The loss, the gradient and the saved FP8 KV caches (per layer: whether c's codes were kept too) of
// tiny on `tok`, after `edit` changed the master weights.
struct KvRun {
  double loss = 0;
  std::vector<float> grad;
  std::vector<bool> c_cached;
  std::vector<float> norm_grad;  // the kv norms' weight gradients, layer after layer
};
// Relative L2 distance |a - b| / |b|.
double rel_dist(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i)
    d += (double(a[i]) - b[i]) * (double(a[i]) - b[i]), n += double(b[i]) * b[i];
  return std::sqrt(d / n);
}
KvRun kv_run(const OwnedTensor& tok, const std::vector<std::string>& o,
             const std::function<void(ParamStore&)>& edit = {}) {
  const Config c = tiny(o);
  Model m(c);
  if (edit) edit(m.params());
  MicroBatchState st;
  KvRun r;
  r.loss = m.stage_forward(tok, Tensor(), st, /*training=*/true).total;
  for (const Block::Saved& s : st.saved) r.c_cached.push_back(!s.attn.kv_c_fp8.codes.t.empty());
  m.stage_backward(st, Tensor());
  r.grad = grads(m);
  const ParamStore& ps = m.params();
  for (size_t i = 0; i < ps.params().size(); ++i)
    if (ps.param(i).name.find("kv_a_layernorm") != std::string::npos) {
      const Tensor g = ps.grad(i);
      r.norm_grad.insert(r.norm_grad.end(), g.f32(), g.f32() + g.numel());
    }
  return r;
}
std::vector<std::string> with(std::vector<std::string> o, const std::string& extra) {
  o.push_back(extra);
  return o;
}
}  // namespace

// The FP8 KV cache keeps the E4M3 codes of RMSNorm(c) that kv_b_proj's FP8 Fprop uses: under FP8
// Fprop the forward is the one without the cache to the bit, and only the backward sees the cached
// values (c recovered from the norm's output), so the gradient differs from the uncached one by
// E4M3-sized roundings and no more. Without FP8 Fprop the cache does round the forward.
TEST(Fp8KvCache, AddsNoForwardRoundingUnderFp8Fprop) {
  const OwnedTensor tok = tokens(tiny({}), 2, 24);
  const std::string kv = "model.mla.use_fp8_kv=true";
  // Norm weights other than their initial ones, so that recovering c must divide by them.
  const auto vary = [](ParamStore& ps) {
    for (size_t i = 0; i < ps.params().size(); ++i)
      if (ps.param(i).name.find("kv_a_layernorm") != std::string::npos) {
        const Tensor w = ps.value(i);
        for (int64_t j = 0; j < w.numel(); ++j) w.f32()[j] = 0.5f + 0.25f * static_cast<float>(j % 5);
      }
  };
  const KvRun plain = kv_run(tok, kFp8, vary), cached = kv_run(tok, with(kFp8, kv), vary);
  EXPECT_EQ(cached.loss, plain.loss) << "the FP8 KV cache changed the forward under FP8 Fprop";
  EXPECT_FALSE(same_bits(cached.grad, plain.grad)) << "the backward did not use the cached values";
  const double c = cosine(cached.grad, plain.grad);
  EXPECT_GT(c, 0.998) << "gradient cosine of the cached run with the uncached one";
  for (bool b : cached.c_cached) EXPECT_FALSE(b) << "c cached although the norm weights are away from 0";
  // The kv norms' weight gradients (sums of dy times the recovered normalized latent) are the most
  // direct witness of c's recovery: off by E4M3's few percent, not by a misplaced factor.
  const double dn = rel_dist(cached.norm_grad, plain.norm_grad);
  EXPECT_LT(dn, 0.1) << "kv norm weight gradients, relative distance to the uncached run";
  std::printf(
      "FP8 KV cache under FP8 Fprop: same loss %.6f, gradient cosine with no cache %.7f, "
      "kv norm weight gradients %.4f apart\n",
      cached.loss, c, dn);

  // Without FP8 Fprop (bf16 forward GEMMs), the cached codes are a forward rounding of RMSNorm(c).
  const std::vector<std::string> no_fprop = with(kFp8, "training.fp8_passes=[dgrad, wgrad]");
  const KvRun plain_b = kv_run(tok, no_fprop, vary), cached_b = kv_run(tok, with(no_fprop, kv), vary);
  EXPECT_NE(cached_b.loss, plain_b.loss);
  EXPECT_NEAR(cached_b.loss, plain_b.loss, 1e-3 * plain_b.loss);
  EXPECT_GT(cosine(cached_b.grad, plain_b.grad), 0.99);
}

// A kv norm weight near zero: RMSNorm(c) no longer determines c there, so that layer caches c's codes
// as well; the forward is still the uncached one and the gradient still close to it.
TEST(Fp8KvCache, CachesTheLatentTooWhenANormWeightIsNearZero) {
  const OwnedTensor tok = tokens(tiny({}), 2, 24);
  std::string first_norm;
  const auto zero_one = [&](ParamStore& ps) {
    for (size_t i = 0; i < ps.params().size(); ++i)
      if (ps.param(i).name.find("kv_a_layernorm") != std::string::npos) {
        first_norm = ps.param(i).name;
        ps.value(i).f32()[3] = 0.0f;
        return;
      }
  };
  const KvRun plain = kv_run(tok, kFp8, zero_one);
  const KvRun cached = kv_run(tok, with(kFp8, "model.mla.use_fp8_kv=true"), zero_one);
  ASSERT_FALSE(first_norm.empty());
  ASSERT_GE(cached.c_cached.size(), 2u);
  EXPECT_TRUE(cached.c_cached[0]) << first_norm << " has a zero entry, yet c was not cached";
  for (size_t l = 1; l < cached.c_cached.size(); ++l) EXPECT_FALSE(cached.c_cached[l]) << "layer " << l;
  EXPECT_EQ(cached.loss, plain.loss);
  for (float g : cached.grad) ASSERT_TRUE(std::isfinite(g));
  const double c = cosine(cached.grad, plain.grad), dn = rel_dist(cached.norm_grad, plain.norm_grad);
  EXPECT_GT(c, 0.998);
  EXPECT_LT(dn, 0.1);
  std::printf(
      "a zero in %s: c cached too, gradient cosine with no cache %.7f, kv norm weight "
      "gradients %.4f apart\n",
      first_norm.c_str(), c, dn);
}

TEST(Precision, SavedActivationsAreStoredInTheirFormats) {
  for (const auto& prec : {kBf16, kFp8All}) {
    const Config c = tiny(prec);
    Model m(c);
    const OwnedTensor tok = tokens(c, 2, 16);
    MicroBatchState st;
    m.stage_forward(tok, Tensor(), st, /*training=*/true);
    const bool fp8 = prec.size() > 2;
    ASSERT_FALSE(st.saved.empty());
    for (const Block::Saved& s : st.saved) {
      EXPECT_EQ(s.attn.q.t.dtype(), DType::BF16);
      EXPECT_EQ(s.attn.o.t.dtype(), DType::BF16);
      EXPECT_EQ(s.attn.lse.t.dtype(), DType::F32);  // statistics stay fp32
      EXPECT_EQ(s.xn_rstd.t.dtype(), DType::F32);
      EXPECT_EQ(s.h.t.dtype(), DType::BF16);
      if (fp8) {  // the KV latent in FP8, keys and values dropped until the backward
        EXPECT_EQ(s.attn.kv_fp8.codes.t.dtype(), DType::F8E4M3);
        EXPECT_TRUE(s.attn.k.t.empty());
        EXPECT_TRUE(s.attn.kva.t.empty());
      } else {
        EXPECT_EQ(s.attn.k.t.dtype(), DType::BF16);
      }
      if (s.moe.plan.rows > 0) {
        EXPECT_EQ(s.moe.g.t.dtype(), DType::BF16);
        EXPECT_EQ(s.moe.scores.t.dtype(), DType::F32);  // the router stays fp32
        if (fp8) {
          EXPECT_EQ(s.moe.x_fp8.codes.t.dtype(), DType::F8E4M3);
        }
      }
    }
    for (size_t l = 0; l + 1 < st.hs.size(); ++l) EXPECT_EQ(st.hs[l].t.dtype(), DType::BF16) << l;
    m.stage_backward(st, Tensor());  // restores and differentiates without complaint
  }
}

TEST(Precision, ComputeWeightsAreTheRoundedMasters) {
  Model m(tiny(kBf16));
  const ParamStore& ps = m.params();
  ASSERT_TRUE(ps.bf16_compute());
  for (size_t i = 0; i < ps.params().size(); i += 7) {
    const Tensor v = ps.value(i), c = ps.compute(i);
    ASSERT_EQ(c.dtype(), DType::BF16);
    const auto* h = static_cast<const uint16_t*>(c.data());
    for (int64_t j = 0; j < v.numel(); j += 13)
      ASSERT_EQ(h[j], lowp::to_bf16(v.f32()[j])) << ps.param(i).name;
  }
  // A change of the masters reaches the next forward.
  const OwnedTensor tok = tokens(tiny(kBf16), 1, 12);
  const double before = m.forward(tok).total;
  const Tensor w = m.params().value(m.embedding_param());
  for (int64_t j = 0; j < w.numel(); ++j) w.f32()[j] *= 1.5f;
  EXPECT_NE(m.forward(tok).total, before);
}

TEST(Precision, Fp8WithoutBf16IsRefusedNamingTheKey) {
  for (const char* key : {"training.use_fp8", "model.mla.use_fp8_kv", "model.moe.deep_ep_fp8"}) {
    std::string msg;
    try {
      tiny({"training.precision=fp32", std::string(key) + "=true"});
    } catch (const Error& e) {
      msg = e.what();
    }
    EXPECT_NE(msg.find(key), std::string::npos) << msg;
    EXPECT_NE(msg.find("training.precision: bf16"), std::string::npos) << msg;
  }
}
