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
#include "model/common.hpp"
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

// training.fp8_operands: listing all three operands is the default (the FP8 kernels). Leaving out
// activations and weights leaves the forward bf16's to the bit; leaving out only the gradients leaves
// it FP8's up to fp32 summation order; every partial list gives gradients of its own.
TEST(Precision, Fp8OperandsPickWhichOperandsAreQuantized) {
  const OwnedTensor tok = tokens(tiny({}), 2, 24);
  const auto run = [&](const std::vector<std::string>& o, const std::string& operands) {
    return loss_and_grads(tok, o, "training.fp8_operands", operands);
  };
  const auto bf16 = run(kBf16, ""), all = run(kFp8, ""),
             listed = run(kFp8, "[gradients, weights, activations]");
  EXPECT_EQ(listed.first, all.first);
  EXPECT_TRUE(same_bits(listed.second, all.second));
  for (const std::string operands : {"[activations]", "[weights]", "[gradients]", "[activations, weights]",
                                     "[activations, gradients]", "[weights, gradients]"}) {
    const auto r = run(kFp8, operands);
    const bool forward_fp8 =
        operands.find("activations") != std::string::npos || operands.find("weights") != std::string::npos;
    if (!forward_fp8) {
      EXPECT_EQ(r.first, bf16.first) << operands << ": the forward quantized something";
    } else {
      EXPECT_NE(r.first, bf16.first) << operands << " gave bf16's loss";
    }
    // Summation order moves bf16 roundings of the outputs, so "FP8's forward" is a fraction of the
    // distance between FP8's and bf16's losses.
    const double fp8_gap = std::fabs(all.first - bf16.first), from_all = std::fabs(r.first - all.first);
    std::printf("%-26s loss %.7f: %.3g from all-FP8's (bf16's is %.3g away)\n", operands.c_str(), r.first,
                from_all, fp8_gap);
    if (operands == "[activations, weights]") {
      EXPECT_LT(from_all, 0.5 * fp8_gap) << operands << ": not FP8's forward";
    } else if (forward_fp8) {
      EXPECT_GT(from_all, 0.0) << operands << " gave all-FP8's loss";
    }
    EXPECT_FALSE(same_bits(r.second, bf16.second)) << operands << " gave bf16's gradient";
    EXPECT_FALSE(same_bits(r.second, all.second)) << operands << " gave all-FP8's gradient";
    EXPECT_GT(cosine(r.second, all.second), 0.99) << operands;
  }
  EXPECT_EQ(precision_summary(tiny(kFp8, "training.fp8_operands=[weights, gradients]")),
            "bf16 + fp8 gemms (weights, gradients only)");
}

// training.fp8_rounding: stochastic rounding gives another loss and gradient than rounding to
// nearest, as close to them as FP8 is to bf16; its draws hash the operand's values, so every recompute
// mode computes the same bits.
TEST(Precision, StochasticFp8RoundingIsReproducibleAndCloseToNearest) {
  const OwnedTensor tok = tokens(tiny({}), 2, 24);
  const auto run = [&](const std::vector<std::string>& o, const std::string& recompute) {
    return loss_and_grads(tok, o, "training.recompute", recompute);
  };
  std::vector<std::string> sr = kFp8;
  sr.push_back("training.fp8_rounding=stochastic");
  const auto bf16 = run(kBf16, ""), nearest = run(kFp8, ""), a = run(sr, ""), full = run(sr, "full");
  EXPECT_EQ(a.first, full.first);
  EXPECT_TRUE(same_bits(a.second, full.second)) << "a recompute drew other roundings";
  EXPECT_NE(a.first, nearest.first);
  EXPECT_FALSE(same_bits(a.second, nearest.second));
  const double fp8_gap = std::fabs(nearest.first - bf16.first);
  EXPECT_LT(std::fabs(a.first - bf16.first), 5 * fp8_gap + 1e-4 * bf16.first);
  // Stochastic rounding's errors are larger than nearest's (up to a whole step of the grid, not half),
  // unbiased instead of deterministic.
  EXPECT_GT(cosine(a.second, bf16.second), 0.95);
  std::printf(
      "loss: bf16 %.7f, FP8 nearest %.7f, FP8 stochastic %.7f; gradient cosine with bf16: "
      "nearest %.5f, stochastic %.5f\n",
      bf16.first, nearest.first, a.first, cosine(nearest.second, bf16.second), cosine(a.second, bf16.second));
  EXPECT_EQ(precision_summary(tiny(sr)), "bf16 + fp8 gemms, stochastic rounding");
}

namespace {
// The values of x [rows, cols] after E4M3 with 1 x 128 tiles along its rows (or 128 x 128 blocks).
std::vector<float> fp8_round(const std::vector<float>& x, int64_t rows, int64_t cols, bool blocks) {
  std::vector<uint8_t> q(x.size());
  std::vector<float> s(static_cast<size_t>(lowp::tiles(rows) * lowp::tiles(cols) * 128)), out(x.size());
  if (blocks) {
    lowp::quantize_blocks(x.data(), rows, cols, q.data(), s.data());
    lowp::dequantize_blocks(q.data(), s.data(), rows, cols, out.data());
  } else {
    lowp::quantize_tiles(x.data(), rows, cols, q.data(), s.data());
    lowp::dequantize_tiles(q.data(), s.data(), rows, cols, out.data());
  }
  return out;
}
std::vector<float> transpose(const std::vector<float>& x, int64_t rows, int64_t cols) {
  std::vector<float> t(x.size());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) t[j * rows + i] = x[i * cols + j];
  return t;
}
// c [M, N] = a [M, K] b [N, K]^T in double, and the sums of |terms| (the scale of fp32's error).
void naive_abt(const std::vector<float>& a, const std::vector<float>& b, int64_t M, int64_t N, int64_t K,
               std::vector<double>& c, std::vector<double>& mag) {
  c.assign(M * N, 0.0), mag.assign(M * N, 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(a[m * K + k]) * b[n * K + k];
        c[m * N + n] += p, mag[m * N + n] += std::fabs(p);
      }
}
}  // namespace

// The operand ablation's GEMMs against a naive double reference: Fprop quantizes x in 1 x 128 tiles
// along K and w in 128 x 128 blocks, Dgrad dy along N and w, Wgrad dy and x in tiles along the
// tokens, each only when its operand is listed. With all three listed the FP8 kernels meet the same
// reference, so the ablation rounds where the kernels do. Rows of very different sizes make tiles
// along K and along the tokens differ.
TEST(Fp8Operands, EachListedOperandIsRoundedWhereTheFp8KernelsRoundIt) {
  const int64_t M = 150, K = 200, N = 140;  // tokens, input and output features (ragged tiles)
  std::mt19937 rng(11);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::uniform_real_distribution<float> e(-4.0f, 4.0f);
  const auto fill = [&](int64_t rows, int64_t cols) {
    std::vector<float> v(rows * cols);
    for (int64_t i = 0; i < rows; ++i) {
      const float s = std::exp(e(rng));
      for (int64_t j = 0; j < cols; ++j) v[i * cols + j] = s * g(rng);
    }
    return v;
  };
  const std::vector<float> x = fill(M, K), w = fill(N, K), dy = fill(M, N);
  const auto tensor = [](const std::vector<float>& v, int64_t r, int64_t c, const char* name) {
    OwnedTensor t(DType::F32, {r, c}, name);
    std::copy(v.begin(), v.end(), t.f32());
    return t;
  };
  const OwnedTensor xt = tensor(x, M, K, "x"), wt = tensor(w, N, K, "w"), dyt = tensor(dy, M, N, "dy");
  const std::vector<float> wq = fp8_round(w, N, K, true);
  const std::vector<float> wT = transpose(w, N, K), wqT = transpose(wq, N, K);
  const std::vector<float> dyT = transpose(dy, M, N), xT = transpose(x, M, K);
  const auto check = [](const Tensor& got, const std::vector<double>& ref, const std::vector<double>& mag,
                        const std::string& what) {
    int64_t bad = 0;
    for (size_t i = 0; i < ref.size(); ++i)
      if (std::fabs(got.f32()[i] - ref[i]) > 1e-5 * mag[i] + 1e-30) ++bad;
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << ref.size() << " entries off the reference";
  };
  for (int set = 1; set < 8; ++set) {
    StepContext ctx;
    Numerics& n = ctx.num;
    n.fp8 = n.fp8_fprop = n.fp8_dgrad = n.fp8_wgrad = n.fp8_attention = n.fp8_ffn = true;
    n.fp8_activations = set & 1, n.fp8_weights = set & 2, n.fp8_gradients = set & 4;
    const std::string what = std::string("activations ") + (n.fp8_activations ? "on" : "off") + ", weights " +
                             (n.fp8_weights ? "on" : "off") + ", gradients " +
                             (n.fp8_gradients ? "on" : "off");
    std::vector<double> ref, mag, plain, pmag;
    // Fprop: y = x w^T.
    OwnedTensor y(DType::F32, {M, N}, "y");
    linear_fwd(ctx, GemmKind::Fp8Attention, xt, wt, y);
    naive_abt(n.fp8_activations ? fp8_round(x, M, K, false) : x, n.fp8_weights ? wq : w, M, N, K, ref, mag);
    check(y, ref, mag, "fprop, " + what);
    naive_abt(x, w, M, N, K, plain, pmag);
    double moved = 0;
    for (size_t i = 0; i < ref.size(); ++i) moved = std::max(moved, std::fabs(ref[i] - plain[i]) / pmag[i]);
    EXPECT_GT(moved, n.fp8_activations || n.fp8_weights ? 1e-3 : -1.0) << what << ": nothing was rounded";
    // Dgrad: dx = dy w.
    OwnedTensor dx(DType::F32, {M, K}, "dx");
    linear_dgrad(ctx, GemmKind::Fp8Ffn, dyt, wt, dx);
    naive_abt(n.fp8_gradients ? fp8_round(dy, M, N, false) : dy, n.fp8_weights ? wqT : wT, M, K, N, ref, mag);
    check(dx, ref, mag, "dgrad, " + what);
    // Wgrad: dw += dy^T x, both tiled along the tokens; accumulates onto what dw holds.
    OwnedTensor dw(DType::F32, {N, K}, "dw");
    for (int64_t i = 0; i < N * K; ++i) dw.f32()[i] = 1.0f;
    linear_wgrad(ctx, GemmKind::Fp8Attention, dyt, xt, dw);
    naive_abt(n.fp8_gradients ? fp8_round(dyT, N, M, false) : dyT,
              n.fp8_activations ? fp8_round(xT, K, M, false) : xT, N, K, M, ref, mag);
    for (size_t i = 0; i < ref.size(); ++i) ref[i] += 1.0, mag[i] += 1.0;
    check(dw, ref, mag, "wgrad, " + what);
  }
}

namespace {
// The loss and the gradients, parameter by parameter, of tiny (settings `o` plus `extra`) on `tok`
// after `edit` changed the master weights.
struct GradRun {
  double loss = 0;
  std::vector<std::string> names;
  std::vector<std::vector<float>> grads;
};
GradRun run_with(const OwnedTensor& tok, const std::vector<std::string>& o, const std::string& extra,
                 const std::function<void(ParamStore&)>& edit) {
  Model m(tiny(o, extra));
  edit(m.params());
  GradRun r;
  r.loss = m.forward_backward(tok).total;
  const ParamStore& ps = m.params();
  for (size_t i = 0; i < ps.params().size(); ++i) {
    const Tensor g = ps.grad(i);
    r.names.push_back(ps.param(i).name);
    r.grads.emplace_back(g.f32(), g.f32() + g.numel());
  }
  return r;
}
double rel_dist(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i)
    d += (double(a[i]) - b[i]) * (double(a[i]) - b[i]), n += double(b[i]) * b[i];
  return std::sqrt(d / n);
}
}  // namespace

// The FP8 KV cache keeps the E4M3 codes of RMSNorm(c) that kv_b_proj's FP8 Fprop uses, and the latent
// itself in the kv_a output. Under FP8 Fprop the forward is the one without the cache to the bit; in
// the backward the keys and values, the norm and everything below are too, and only kv_b_proj's
// weight gradient differs: its Wgrad takes the cached values. Without FP8 Fprop the cache does round
// the forward (kv_b_proj's bf16 GEMM takes the codes' values).
TEST(Fp8KvCache, AddsNoForwardRoundingUnderFp8Fprop) {
  const OwnedTensor tok = tokens(tiny({}), 2, 24);
  const std::string kv = "model.mla.use_fp8_kv=true";
  // Norm weights other than their initial ones.
  const auto vary = [](ParamStore& ps) {
    for (size_t i = 0; i < ps.params().size(); ++i)
      if (ps.param(i).name.find("kv_a_layernorm") != std::string::npos) {
        const Tensor w = ps.value(i);
        for (int64_t j = 0; j < w.numel(); ++j) w.f32()[j] = 0.5f + 0.25f * static_cast<float>(j % 5);
      }
  };
  const GradRun plain = run_with(tok, kFp8, "", vary), cached = run_with(tok, kFp8, kv, vary);
  EXPECT_EQ(cached.loss, plain.loss) << "the FP8 KV cache changed the forward under FP8 Fprop";
  int kv_b = 0;
  for (size_t i = 0; i < plain.names.size(); ++i) {
    const std::string& n = plain.names[i];
    if (n.find("kv_b_proj") == std::string::npos) {
      EXPECT_TRUE(same_bits(cached.grads[i], plain.grads[i])) << n << ": gradient changed by the cache";
      continue;
    }
    ++kv_b;
    const double d = rel_dist(cached.grads[i], plain.grads[i]);
    EXPECT_GT(d, 0.0) << n << ": its Wgrad did not take the cached values";
    EXPECT_LT(d, 0.1) << n;
    std::printf("FP8 KV cache under FP8 Fprop: %s gradient %.4f from the uncached one\n", n.c_str(), d);
  }
  EXPECT_GE(kv_b, 2);

  // Without FP8 Fprop (bf16 forward GEMMs), the cached codes are a forward rounding of RMSNorm(c).
  std::vector<std::string> no_fprop = kFp8;
  no_fprop.push_back("training.fp8_passes=[dgrad, wgrad]");
  const GradRun plain_b = run_with(tok, no_fprop, "", vary), cached_b = run_with(tok, no_fprop, kv, vary);
  EXPECT_NE(cached_b.loss, plain_b.loss);
  EXPECT_NEAR(cached_b.loss, plain_b.loss, 1e-3 * plain_b.loss);
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
      if (fp8) {  // the normed KV latent in FP8; its copies, keys and values dropped until the backward
        EXPECT_EQ(s.attn.kv_fp8.codes.t.dtype(), DType::F8E4M3);
        EXPECT_TRUE(s.attn.k.t.empty());
        EXPECT_TRUE(s.attn.c.t.empty());
        EXPECT_TRUE(s.attn.c_n.t.empty());
        EXPECT_EQ(s.attn.kva.t.dtype(), DType::BF16);
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
