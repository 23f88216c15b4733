// Training pieces: AdamW against a hand computation of PyTorch's update, the LR schedule, global-norm
// clipping, and the training loop end to end on a small synthetic dataset (loss falls, metrics
// written, deterministic, non-finite steps skipped and counted, clean stop on request).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "config/config.hpp"
#include "core/error.hpp"
#include "data/indexed_dataset.hpp"
#include "io/checkpoint.hpp"
#include "model/params.hpp"
#include "test_util.hpp"
#include "train/optimizer.hpp"
#include "train/trainer.hpp"

using namespace dsv3;
namespace fs = std::filesystem;

TEST(AdamW, MatchesTheDecoupledUpdateByHand) {
  ParamStore ps;
  ps.add("w", {3}, ParamInit::Zeros, ParamGroup::Dense, /*weight_decay=*/true);
  ps.add("norm", {2}, ParamInit::Ones, ParamGroup::Dense, /*weight_decay=*/false);
  ps.allocate();
  ps.initialize(1, 1.0);
  const float init[] = {0.5f, -1.0f, 2.0f};
  for (int i = 0; i < 3; ++i) ps.value(0).f32()[i] = init[i];
  AdamWConfig c;
  c.beta1 = 0.9, c.beta2 = 0.95, c.eps = 1e-8, c.weight_decay = 0.1;
  AdamW opt(ps, c);
  const double lr = 0.01;
  double m[3] = {0, 0, 0}, v[3] = {0, 0, 0}, w[3] = {0.5, -1.0, 2.0};
  const double g_steps[2][3] = {{0.1, -0.2, 0.3}, {-0.05, 0.4, 0.0}};
  for (int t = 1; t <= 2; ++t) {
    for (int i = 0; i < 3; ++i) ps.grad(0).f32()[i] = static_cast<float>(g_steps[t - 1][i]);
    ps.grad(1).f32()[0] = 1.0f;
    opt.step(lr);
    for (int i = 0; i < 3; ++i) {  // PyTorch AdamW: decay, then the bias-corrected Adam step
      const double g = g_steps[t - 1][i];
      m[i] = 0.9 * m[i] + 0.1 * g;
      v[i] = 0.95 * v[i] + 0.05 * g * g;
      const double mh = m[i] / (1 - std::pow(0.9, t)), vh = v[i] / (1 - std::pow(0.95, t));
      w[i] = w[i] * (1 - lr * 0.1) - lr * mh / (std::sqrt(vh) + 1e-8);
      EXPECT_NEAR(ps.value(0).f32()[i], w[i], 1e-6) << "step " << t << " element " << i;
    }
  }
  // No weight decay on the norm: after two steps of gradient 1 it moved by exactly 2 * lr.
  EXPECT_NEAR(ps.value(1).f32()[0], 1.0 - 2 * lr, 1e-6);
  EXPECT_FLOAT_EQ(ps.value(1).f32()[1], 1.0f);  // zero gradient, no decay: untouched
  EXPECT_EQ(opt.steps(), 2);
}

namespace {
// bf16 rounding written out here (round to nearest, ties to even, on the float's bits), independent
// of core/lowp.
float bf16_by_hand(float f) {
  const uint32_t u = test_util::bits(f), lower = u & 0xFFFFu, keep = u & 0xFFFF0000u;
  const bool up = lower > 0x8000u || (lower == 0x8000u && (keep & 0x10000u));
  return test_util::from_bits(up ? keep + 0x10000u : keep);
}
bool is_bf16(float f) { return (test_util::bits(f) & 0xFFFFu) == 0; }
}  // namespace

// training.optimizer.moment_dtype: bf16: m and v are stored rounded to bf16 after every step and the
// update uses the stored values; the masters stay fp32. Checked against that computation by hand over
// 30 steps of random gradients, and the state survives a checkpoint round trip exactly.
TEST(AdamW, Bf16MomentsMatchTheRoundedUpdateByHand) {
  const int n = 300;
  auto store = [&] {
    auto ps = std::make_unique<ParamStore>();
    ps->add("w", {n}, ParamInit::Zeros, ParamGroup::Dense, /*weight_decay=*/true);
    ps->allocate();
    ps->initialize(1, 1.0);
    for (int i = 0; i < n; ++i) ps->value(0).f32()[i] = 0.01f * float(i % 17) - 0.08f;
    return ps;
  };
  auto ps = store(), ps32 = store();
  AdamWConfig c;
  c.bf16_moments = true;
  AdamW opt(*ps, c);
  AdamWConfig c32 = c;
  c32.bf16_moments = false;
  AdamW opt32(*ps32, c32);
  const int64_t N = opt.num_moments();  // the store's flat buffer, padded: w is its first n elements
  ASSERT_GE(N, n);
  EXPECT_EQ(opt.moment_bytes(), 2 * N * 2);
  EXPECT_EQ(opt32.moment_bytes(), 2 * N * 4);
  std::vector<float> m(n, 0.0f), v(n, 0.0f), w(ps->value(0).f32(), ps->value(0).f32() + n);
  std::mt19937 gen(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const float b1 = 0.9f, b2 = 0.95f, lr = 1e-3f;
  for (int t = 1; t <= 30; ++t) {
    for (int i = 0; i < n; ++i) {
      const float g = nd(gen) * std::pow(10.0f, float(i % 7) - 4.0f);  // magnitudes 1e-4 .. 1e2
      ps->grad(0).f32()[i] = ps32->grad(0).f32()[i] = g;
      m[i] = bf16_by_hand(b1 * m[i] + (1.0f - b1) * g);
      v[i] = bf16_by_hand(b2 * v[i] + (1.0f - b2) * g * g);
      const double mh = m[i] / (1 - std::pow(0.9, t)), vh = v[i] / (1 - std::pow(0.95, t));
      w[i] = float(w[i] * (1 - lr * 0.1) - lr * mh / (std::sqrt(vh) + 1e-8));
    }
    opt.step(lr);
    opt32.step(lr);
  }
  const OptimizerState st = opt.checkpoint_state();
  ASSERT_EQ(int64_t(opt.exp_avg().size()), N);
  int not_bf16_in_fp32 = 0;
  for (int i = 0; i < n; ++i) {
    ASSERT_TRUE(is_bf16(opt.exp_avg()[i]) && is_bf16(opt.exp_avg_sq()[i])) << "element " << i;
    EXPECT_EQ(opt.exp_avg()[i], m[i]) << "m, element " << i;
    EXPECT_EQ(opt.exp_avg_sq()[i], v[i]) << "v, element " << i;
    EXPECT_NEAR(ps->value(0).f32()[i], w[i], 1e-6f + 1e-5f * std::fabs(w[i])) << "w, element " << i;
    not_bf16_in_fp32 += !is_bf16(opt32.exp_avg()[i]);
  }
  EXPECT_GT(not_bf16_in_fp32, n / 2) << "fp32 moments should not be bf16 values";
  // A checkpoint round trip: the state copied into a fresh optimizer, one more step on each, equal.
  auto ps2 = store();
  std::memcpy(ps2->value(0).f32(), ps->value(0).f32(), n * sizeof(float));
  AdamW opt2(*ps2, c);
  opt2.checkpoint_state();
  opt2.exp_avg() = opt.exp_avg(), opt2.exp_avg_sq() = opt.exp_avg_sq();
  opt2.set_steps(opt.steps());
  opt2.state_loaded();
  EXPECT_TRUE(opt2.exp_avg().empty()) << "the fp32 copy is dropped after loading";
  for (int i = 0; i < n; ++i) ps->grad(0).f32()[i] = ps2->grad(0).f32()[i] = nd(gen);
  opt.step(lr);
  opt2.step(lr);
  EXPECT_TRUE(opt.exp_avg().empty()) << "the checkpoint copy is dropped at the next step";
  EXPECT_EQ(0, std::memcmp(ps->value(0).f32(), ps2->value(0).f32(), n * sizeof(float)));
}

TEST(Schedule, WarmupCosineAndConstantPhase) {
  TrainingConfig t;
  t.train_steps = 110;
  t.optimizer.lr = 1.0;
  t.optimizer.min_lr = 0.1;
  t.schedule.style = "cosine";
  t.schedule.warmup_steps = 10;
  EXPECT_DOUBLE_EQ(learning_rate(t, 0), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(t, 9), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(t, 10), 1.0);
  EXPECT_NEAR(learning_rate(t, 60), 0.55, 1e-12);  // halfway down the cosine
  EXPECT_NEAR(learning_rate(t, 110), 0.1, 1e-12);
  for (int64_t s = 11; s < 110; ++s) EXPECT_LE(learning_rate(t, s), learning_rate(t, s - 1));
  t.schedule.style = "constant_cosine";
  t.schedule.constant_steps = 50;
  EXPECT_DOUBLE_EQ(learning_rate(t, 59), 1.0);
  EXPECT_NEAR(learning_rate(t, 85), 0.55, 1e-12);
  t.schedule.style = "constant";
  EXPECT_DOUBLE_EQ(learning_rate(t, 100), 1.0);
}

TEST(ClipGradNorm, ReportsAndScales) {
  ParamStore ps;
  ps.add("a", {2}, ParamInit::Zeros);
  ps.add("b", {1}, ParamInit::Zeros);
  ps.allocate();
  ps.grad(0).f32()[0] = 3, ps.grad(0).f32()[1] = 0, ps.grad(1).f32()[0] = 4;
  EXPECT_DOUBLE_EQ(clip_grad_norm(ps, 10.0), 5.0);
  EXPECT_FLOAT_EQ(ps.grad(1).f32()[0], 4.0f);  // under the limit: untouched
  EXPECT_DOUBLE_EQ(clip_grad_norm(ps, 1.0), 5.0);
  EXPECT_NEAR(ps.grad(0).f32()[0], 0.6, 1e-6);
  EXPECT_NEAR(ps.grad(1).f32()[0], 0.8, 1e-6);
  ps.grad(1).f32()[0] = NAN;
  EXPECT_TRUE(std::isnan(clip_grad_norm(ps, 1.0)));
}

namespace {
// A small repetitive corpus (so a tiny model can learn it quickly) in dsv3-data's layout.
std::string make_dataset(const std::string& dir) {
  fs::create_directories(dir);
  const std::string prefix = dir + "/synthetic";
  for (const char* split : {"_train", "_valid"}) {
    IndexedDatasetWriter w(prefix + split, TokenDType::UInt16);
    for (int d = 0; d < (split[1] == 't' ? 64 : 8); ++d) {
      std::vector<int32_t> doc;
      const std::string text = "the quick brown fox jumps over the lazy dog " + std::to_string(d % 7) + ". ";
      for (int r = 0; r < 4; ++r)
        for (unsigned char ch : text) doc.push_back(ch);
      doc.push_back(257);
      w.add_document(doc);
    }
    w.finalize();
  }
  return prefix;
}

Config small_config(std::vector<std::string> extra = {}) {
  std::vector<std::string> o = {
      "training.seq_length=32",  "training.micro_batch_size=4",      "training.global_batch_size=8",
      "training.train_steps=12", "training.log_interval=4",          "training.eval_interval=6",
      "training.eval_iters=2",   "training.schedule.warmup_steps=2", "training.optimizer.lr=0.01"};
  o.insert(o.end(), extra.begin(), extra.end());
  return load_config(resolve_config_path("tiny"), o);
}

std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::ifstream f(path);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(f, line);) {
    nlohmann::json r = nlohmann::json::parse(line);
    if (!r.contains("checkpoint") && !r.contains("checkpoint_failed"))
      out.push_back(std::move(r));  // steps, evals
  }
  return out;
}
// The total loss of every step of a run (evaluations and checkpoint records left out).
std::vector<double> losses_of(const std::string& run) {
  std::vector<double> l;
  for (const auto& r : read_metrics(run + "/metrics.jsonl"))
    if (!r.contains("val_loss")) l.push_back(r["loss"].get<double>());
  return l;
}
}  // namespace

TEST(Trainer, LossFallsAndMetricsAreWritten) {
  const std::string dir = ::testing::TempDir() + "/dsv3_train_basic";
  fs::remove_all(dir);
  TrainerOptions opt;
  opt.data = make_dataset(dir + "/data");
  opt.run_dir = dir + "/run";
  opt.peak_tflops = 1.0;
  std::ostringstream log;
  opt.log = &log;
  const TrainSummary s = train(small_config(), opt);
  EXPECT_EQ(s.steps, 12);
  EXPECT_LT(s.last_loss, s.first_loss - 0.5) << log.str();
  EXPECT_GE(s.last_val_loss, 0);
  EXPECT_LT(s.last_val_loss, s.first_val_loss);
  const auto records = read_metrics(opt.run_dir + "/metrics.jsonl");
  int steps = 0, evals = 0;
  for (const auto& r : records) {
    if (r.contains("val_loss")) {
      ++evals;
      continue;
    }
    ++steps;
    for (const char* k : {"step", "tokens", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm",
                          "tokens_per_s", "mfu"})
      EXPECT_TRUE(r.contains(k)) << k;
  }
  EXPECT_EQ(steps, 12);
  EXPECT_EQ(evals, 2);
  EXPECT_TRUE(fs::exists(opt.run_dir + "/config.yaml"));
  EXPECT_NE(log.str().find("step 4/12"), std::string::npos) << log.str();
}

TEST(Trainer, DeterministicForAFixedSeed) {
  const std::string dir = ::testing::TempDir() + "/dsv3_train_det";
  fs::remove_all(dir);
  const std::string data = make_dataset(dir + "/data");
  std::vector<double> losses[2];
  for (int run = 0; run < 2; ++run) {
    TrainerOptions opt;
    opt.data = data;
    opt.run_dir = dir + "/run" + std::to_string(run);
    opt.peak_tflops = 1.0;
    std::ostringstream log;
    opt.log = &log;
    train(small_config({"training.train_steps=5", "training.eval_interval=0"}), opt);
    for (const auto& r : read_metrics(opt.run_dir + "/metrics.jsonl"))
      if (!r.contains("val_loss")) losses[run].push_back(r["loss"].get<double>());
  }
  ASSERT_EQ(losses[0].size(), 5u);
  EXPECT_EQ(losses[0], losses[1]);
}

TEST(Trainer, NonFiniteStepsAreSkippedThenStop) {
  const std::string dir = ::testing::TempDir() + "/dsv3_train_nan";
  fs::remove_all(dir);
  TrainerOptions opt;
  opt.data = make_dataset(dir + "/data");
  opt.run_dir = dir + "/run";
  opt.peak_tflops = 1.0;
  std::ostringstream log;
  opt.log = &log;
  // An absurd learning rate and no clipping blow the weights up after the first update.
  const TrainSummary s =
      train(small_config({"training.optimizer.lr=1e30", "training.optimizer.grad_clip=0",
                          "training.schedule.warmup_steps=0", "training.max_nonfinite_steps=3"}),
            opt);
  EXPECT_TRUE(s.aborted_nonfinite) << log.str();
  EXPECT_EQ(s.skipped, 3);
  EXPECT_NE(log.str().find("update skipped (3 in a row, limit 3)"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("stopping: 3 non-finite steps in a row"), std::string::npos) << log.str();
}

TEST(Trainer, BadDataIsReportedBeforeTraining) {
  const std::string dir = ::testing::TempDir() + "/dsv3_train_bad";
  fs::remove_all(dir);
  TrainerOptions opt;
  opt.run_dir = dir + "/run";
  opt.data = dir + "/missing";
  try {
    train(small_config(), opt);
    FAIL() << "missing data accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir + "/missing"), std::string::npos) << e.what();
  }
  // Token ids beyond the vocabulary.
  fs::create_directories(dir + "/data");
  {
    IndexedDatasetWriter w(dir + "/data/big_train", TokenDType::UInt16);
    w.add_document(std::vector<int32_t>(200, 300));
    w.finalize();
  }
  opt.data = dir + "/data/big";
  try {
    train(small_config(), opt);
    FAIL() << "token id 300 >= vocab 264 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("300"), std::string::npos) << e.what();
  }
}

// `total` steps straight vs `split` + checkpoint + resume + the rest in <TempDir>/<name>: identical
// per-step losses. Returns the first part of the split run; `opt` is left set up for more runs.
TrainSummary expect_resume_bitwise(const std::string& name, std::vector<std::string> extra, int64_t total,
                                   int64_t split, TrainerOptions& opt, std::ostringstream& log) {
  const std::string dir = ::testing::TempDir() + "/" + name;
  fs::remove_all(dir);
  extra.insert(extra.end(), {"training.train_steps=" + std::to_string(total), "training.eval_interval=0"});
  const Config cfg = small_config(extra);
  opt.data = make_dataset(dir + "/data");
  opt.peak_tflops = 1.0;
  opt.log = &log;
  opt.run_dir = dir + "/straight";
  train(cfg, opt);
  opt.run_dir = dir + "/split";
  opt.stop_after_steps = split;
  const TrainSummary first = train(cfg, opt);
  EXPECT_EQ(first.steps, split);
  opt.stop_after_steps = 0;
  const TrainSummary second = train(cfg, opt);  // --resume auto finds the checkpoint of `split`
  EXPECT_EQ(second.resumed_from_step, split);
  EXPECT_EQ(second.steps, total - split);
  const auto a = losses_of(dir + "/straight"), b = losses_of(dir + "/split");
  EXPECT_EQ(a.size(), size_t(total));
  EXPECT_EQ(b.size(), size_t(total));
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) EXPECT_EQ(a[i], b[i]) << "step " << i + 1;
  return first;
}

TEST(Trainer, ResumeContinuesBitwise) {
  // 20 steps straight vs 10 + checkpoint + resume + 10: identical per-step losses and parameters.
  TrainerOptions opt;
  std::ostringstream log;
  const TrainSummary first = expect_resume_bitwise("dsv3_train_resume", {}, 20, 10, opt, log);
  EXPECT_NE(first.last_checkpoint.find("step_0000010.h5"), std::string::npos) << first.last_checkpoint;
  // Starting fresh in a run directory that holds checkpoints is refused.
  opt.resume = "none";
  EXPECT_THROW(train(small_config({"training.train_steps=20", "training.eval_interval=0"}), opt), Error);
}

TEST(Trainer, MixedPrecisionResumesBitwiseAndRecordsItsNumerics) {
  // bf16 + FP8 (GEMMs, KV cache, dispatch) + bf16 Adam moments: 8 steps straight vs 4 + checkpoint +
  // resume + 4.
  TrainerOptions opt;
  std::ostringstream log;
  const std::string dir = ::testing::TempDir() + "/dsv3_train_resume_fp8";
  const TrainSummary first =
      expect_resume_bitwise("dsv3_train_resume_fp8",
                            {"training.precision=bf16", "training.use_fp8=true", "model.mla.use_fp8_kv=true",
                             "model.moe.deep_ep_fp8=true", "training.optimizer.moment_dtype=bf16"},
                            8, 4, opt, log);
  EXPECT_EQ(read_checkpoint_info(first.last_checkpoint).precision,
            "bf16 + fp8 gemms + fp8 kv cache + fp8 dispatch + bf16 moments");
  const auto a = losses_of(dir + "/straight");
  ASSERT_EQ(a.size(), 8u);
  // And the run is not the fp32 run.
  const Config f32 = small_config({"training.train_steps=8", "training.eval_interval=0"});
  opt.run_dir = dir + "/fp32";
  opt.stop_after_steps = 0;
  train(f32, opt);
  const auto c = losses_of(dir + "/fp32");
  ASSERT_EQ(c.size(), 8u);
  EXPECT_NE(a[0], c[0]);
  EXPECT_NEAR(a[0], c[0], 1e-2 * c[0]);
  EXPECT_EQ(read_checkpoint_info(dir + "/fp32/step_0000008.h5").precision, "fp32");
}

TEST(Trainer, BackgroundSavesHoldTheStateOfTheirStep) {
  // Saves written in the background while training goes on hold exactly the state of their step:
  // resuming from one (step 9 of 20, saved every 3 steps) continues with the uninterrupted run's bits.
  const std::string dir = ::testing::TempDir() + "/dsv3_train_async";
  fs::remove_all(dir);
  const std::string data = make_dataset(dir + "/data");
  TrainerOptions opt;
  opt.data = data;
  opt.peak_tflops = 1.0;
  std::ostringstream log;
  opt.log = &log;
  opt.run_dir = dir + "/straight";
  train(small_config({"training.train_steps=20", "training.eval_interval=0"}), opt);
  opt.run_dir = dir + "/saving";
  const TrainSummary s = train(small_config({"training.train_steps=20", "training.eval_interval=0",
                                             "checkpoint.interval=3", "checkpoint.keep_last=10"}),
                               opt);
  ASSERT_EQ(s.checkpoints.size(), 7u) << log.str();  // 3, 6, ..., 18 in the background, 20 at the end
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_TRUE(s.checkpoints[i].async) << i;
    EXPECT_EQ(s.checkpoints[i].step, int64_t(3 * (i + 1)));
    EXPECT_GT(s.checkpoints[i].background_s, 0);
    EXPECT_LT(s.checkpoints[i].stall_s, s.checkpoints[i].total_s);
  }
  EXPECT_FALSE(s.checkpoints.back().async);
  EXPECT_EQ(losses_of(dir + "/straight"), losses_of(dir + "/saving"));  // saving changes nothing
  opt.run_dir = dir + "/resumed";
  opt.resume = dir + "/saving/step_0000009.h5";
  const TrainSummary r = train(small_config({"training.train_steps=20", "training.eval_interval=0"}), opt);
  EXPECT_EQ(r.resumed_from_step, 9);
  const auto a = losses_of(dir + "/straight"), b = losses_of(dir + "/resumed");
  ASSERT_EQ(b.size(), 11u);
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(a[9 + i], b[i]) << "step " << 10 + i;
}
