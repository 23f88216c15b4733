// End-to-end check against the PyTorch reference (tests/reference): the golden file holds the
// tokens, logits, losses, router choices and every parameter gradient of the tiny config computed in
// float64; this model must reproduce them in f32 within 1e-4 (logits, losses) and 1e-3 (gradients,
// relative error by norm). The first tensor that differs is named.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "config/config.hpp"
#include "io/h5.hpp"
#include "model/init.hpp"
#include "model/model.hpp"

using namespace dsv3;

namespace {

std::string golden_path() { return std::string(DSV3_SOURCE_DIR) + "/tests/golden/tiny_golden.h5"; }

// ||a - b|| / ||b||
double rel_err(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

struct Golden {
  h5::File file;
  Config cfg;
  uint64_t seed;
  double bias_std;
  explicit Golden(const std::string& path)
      : file(h5::File::open_read(path)),
        cfg(load_config_from_string(file.read_string_attr("/", "config_yaml"), path + ":config_yaml")),
        seed(static_cast<uint64_t>(file.read_int_attr("/", "seed"))),
        bias_std(file.read_double_attr("/", "bias_std")) {}
};

// Builds the model as the reference did: same initialisation, router biases from the generator.
std::unique_ptr<Model> build(const Golden& g) {
  auto model = std::make_unique<Model>(g.cfg);
  model->initialize(g.seed);
  for (const auto& st : model->params().states()) init_normal_tensor(st.value, g.seed, st.name, g.bias_std);
  return model;
}

}  // namespace

TEST(Golden, MatchesPyTorchReference) {
  Golden g(golden_path());
  auto model = build(g);
  const auto& ps = model->params();

  // 1. Same initial parameters (sum and sum of squares per tensor).
  for (const auto& p : ps.params()) {
    const std::string ds = "/param_stats/" + p.name;
    ASSERT_TRUE(g.file.exists(ds)) << "golden file lacks " << ds << " (parameter missing from the reference)";
    const auto stats = g.file.read_f64(ds);
    double s = 0, s2 = 0;
    for (int64_t i = 0; i < p.value.numel(); ++i)
      s += p.value.f32()[i], s2 += double(p.value.f32()[i]) * p.value.f32()[i];
    ASSERT_NEAR(s2, stats[1], 1e-6 * std::max(1.0, stats[1])) << "initialisation of " << p.name << " differs";
    ASSERT_NEAR(s, stats[0], 1e-5 * std::max(1.0, std::sqrt(stats[1])))
        << "initialisation of " << p.name << " differs";
  }

  // 2. Forward and backward on the recorded tokens.
  std::vector<int64_t> tshape;
  auto tokens = g.file.read_i32("/tokens", &tshape);
  const Tensor tok(tokens.data(), DType::I32, tshape, "tokens");
  ModelCapture cap;
  const StepLosses l = model->forward_backward(tok, 1.0f, &cap);

  std::vector<std::string> report;
  auto check = [&](const std::string& what, double err, double tol) {
    std::printf("  %-60s rel err %.3e (tol %.0e)%s\n", what.c_str(), err, tol,
                err <= tol ? "" : "  <-- FAIL");
    if (!(err <= tol)) report.push_back(what + ": relative error " + std::to_string(err));
  };
  auto scalar = [&](const std::string& name, double mine) {
    const double ref = g.file.read_f64(name)[0];
    check(name + " (" + std::to_string(mine) + " vs " + std::to_string(ref) + ")",
          std::fabs(mine - ref) / std::max(1e-12, std::fabs(ref)), 1e-4);
  };
  scalar("/loss/main", l.main);
  scalar("/loss/total", l.total);
  if (g.file.read_f64("/loss/balance")[0] != 0) scalar("/loss/balance", l.balance);
  const auto mtp_ref = g.file.read_f64("/loss/mtp");
  ASSERT_EQ(mtp_ref.size(), l.mtp.size());
  for (size_t k = 0; k < l.mtp.size(); ++k)
    check("/loss/mtp[" + std::to_string(k) + "]", std::fabs(l.mtp[k] - mtp_ref[k]) / std::fabs(mtp_ref[k]),
          1e-4);

  auto tensor = [&](const std::string& name, const Tensor& mine, double tol) {
    std::vector<int64_t> shape;
    const auto ref = g.file.read_f32(name, &shape);
    ASSERT_EQ(numel_of(shape), mine.numel())
        << name << " has shape " << shape_to_string(shape) << ", model " << mine.shape_str();
    check(name, rel_err(mine.f32(), ref.data(), mine.numel()), tol);
  };
  tensor("/hidden/final", cap.hidden_final, 1e-4);
  tensor("/logits", cap.logits, 1e-4);
  for (size_t k = 0; k < cap.mtp_logits.size(); ++k)
    tensor("/mtp_logits/" + std::to_string(k + 1), cap.mtp_logits[k], 1e-4);

  int64_t flips = 0, choices = 0;
  for (const auto& [layer, r] : cap.router) {
    const auto idx = g.file.read_i32("/router/" + std::to_string(layer) + "/indices");
    for (int64_t i = 0; i < r.first.t.numel(); ++i) flips += idx[i] != r.first.i32()[i], ++choices;
    tensor("/router/" + std::to_string(layer) + "/weights", r.second, 1e-4);
  }
  std::printf("  router choices: %lld of %lld differ\n", static_cast<long long>(flips),
              static_cast<long long>(choices));
  EXPECT_EQ(flips, 0) << "router selections differ from the reference";

  for (const auto& p : ps.params()) tensor("/grads/" + p.name, p.grad, 1e-3);
  ASSERT_TRUE(report.empty()) << "first tensor that differs: " << report.front() << " (" << report.size()
                              << " in all)";
}

TEST(Golden, BitwiseDeterministic) {
  Golden g(golden_path());
  std::vector<int64_t> tshape;
  auto tokens = g.file.read_i32("/tokens", &tshape);
  const Tensor tok(tokens.data(), DType::I32, tshape, "tokens");
  auto a = build(g), b = build(g);
  const StepLosses la = a->forward_backward(tok), lb = b->forward_backward(tok);
  EXPECT_EQ(std::memcmp(&la.total, &lb.total, sizeof(double)), 0);
  const Tensor ga = a->params().flat_grads(), gb = b->params().flat_grads();
  EXPECT_EQ(std::memcmp(ga.data(), gb.data(), ga.bytes()), 0) << "two runs gave different gradient bits";
}
