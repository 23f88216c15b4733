// dsv3-bench: CPU training throughput of the model against the PyTorch reference, MFU against the
// measured sgemm peak, and a per-category profile of one training step.
#include <cblas.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend_info.hpp"
#include "config/accounting.hpp"
#include "config/config.hpp"
#include "core/error.hpp"
#include "core/format.hpp"
#include "host/host_common.hpp"
#include "model/model.hpp"
#include "profile.hpp"
#include "train/metrics.hpp"
#include "train/optimizer.hpp"

extern "C" int openblas_get_num_threads(void);

namespace {

using namespace dsv3;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

struct Options {
  int64_t steps = 5, warmup = 2, profile_steps = 2;
  std::vector<std::string> configs;
  bool torch = true, json_out = false;
};

const char* kUsage =
    "usage: dsv3-bench [--steps N] [--warmup W] [--profile-steps P] [--config PATH] [--no-torch] [--json]\n"
    "  Trains each config for W untimed and N timed steps (forward_backward + AdamW on random tokens,\n"
    "  micro_batch_size x seq_length tokens per step), then P profiled steps; runs the PyTorch reference\n"
    "  (tests/reference/bench_torch.py) on the same shapes with the same thread count.\n"
    "  Default configs: configs/deepseek_v3_tiny.yaml and tools/bench/cpu_d512.yaml.\n"
    "  Threads: OPENBLAS_NUM_THREADS (default all cores) for both implementations.\n";

int64_t parse_count(const std::string& flag, const char* v, int64_t min) {
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  DSV3_CHECK(end && *end == '\0' && n >= min, flag, " expects an integer >= ", min, ", got '", v, "'");
  return n;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      DSV3_CHECK(i + 1 < argc, a, " needs a value\n", kUsage);
      return argv[++i];
    };
    if (a == "--steps")
      o.steps = parse_count(a, value(), 1);
    else if (a == "--warmup")
      o.warmup = parse_count(a, value(), 0);
    else if (a == "--profile-steps")
      o.profile_steps = parse_count(a, value(), 0);
    else if (a == "--config")
      o.configs.push_back(value());
    else if (a == "--no-torch")
      o.torch = false;
    else if (a == "--json")
      o.json_out = true;
    else if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else {
      raise("unknown option '", a, "'\n", kUsage);
    }
  }
  if (o.configs.empty())
    o.configs = {std::string(DSV3_SOURCE_DIR) + "/configs/deepseek_v3_tiny.yaml",
                 std::string(DSV3_SOURCE_DIR) + "/tools/bench/cpu_d512.yaml"};
  return o;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int kokkos_threads() {
#ifdef DSV3_HAVE_KOKKOS
  host::ensure_kokkos();
  return Kokkos::DefaultHostExecutionSpace().concurrency();
#else
  return 1;
#endif
}

// Runs the PyTorch reference; returns its JSON record or null when it could not run.
json run_torch(const std::string& config, const Options& o, int threads) {
  const std::string cmd = "OPENBLAS_NUM_THREADS=" + std::to_string(threads) +
                          " OMP_NUM_THREADS=" + std::to_string(threads) + " /usr/bin/python3 '" +
                          std::string(DSV3_SOURCE_DIR) + "/tests/reference/bench_torch.py' --config '" + config +
                          "' --steps " + std::to_string(o.steps) + " --warmup " + std::to_string(o.warmup) +
                          " --threads " + std::to_string(threads);
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return nullptr;
  std::string out;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int rc = pclose(p);
  if (rc != 0) return nullptr;
  const size_t brace = out.rfind("\n{");
  const std::string line = out.substr(brace == std::string::npos ? 0 : brace + 1);
  try {
    return json::parse(line);
  } catch (const std::exception&) {
    return nullptr;
  }
}

json bench_config(const std::string& path, const Options& o, double peak_tflops, int threads) {
  const Config cfg = load_config(path, {"training.precision=fp32"});
  const ModelConfig& m = cfg.model;
  const int64_t B = cfg.training.micro_batch_size, S = cfg.training.seq_length, W = S + m.mtp.depth + 1;
  Model model(cfg);
  AdamW adam(model.params(), AdamWConfig::from(cfg.training.optimizer));
  const double lr = cfg.training.optimizer.lr;
  std::mt19937_64 rng(1234);
  OwnedTensor tokens(DType::I32, {B, W}, "tokens");
  auto step = [&]() {
    for (int64_t i = 0; i < tokens.t.numel(); ++i)
      tokens.i32()[i] = static_cast<int32_t>(rng() % static_cast<uint64_t>(m.vocab_size));
    model.params().zero_grads();
    const StepLosses l = model.forward_backward(tokens);
    const auto t0 = Clock::now();
    adam.step(lr);
    if (profile::enabled())
      profile::add(profile::Category::Optimizer, std::chrono::duration<double>(Clock::now() - t0).count());
    if (m.moe.aux_loss_free) model.update_router_bias(l.expert_load);
    return l.total;
  };

  for (int64_t i = 0; i < o.warmup; ++i) step();
  std::vector<double> times;
  double loss = 0;
  for (int64_t i = 0; i < o.steps; ++i) {
    const auto t0 = Clock::now();
    loss = step();
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  double total = 0;
  for (double t : times) total += t;
  const double tokens_per_step = double(B * S);
  const double tps = tokens_per_step * double(o.steps) / total;
  const double flops_per_token = training_flops_per_token(m, S).total();
  const double tflops = tps * flops_per_token / 1e12;

  // Profile: separate steps with the per-category timers on.
  json prof = json::array();
  double prof_total = 0;
  if (o.profile_steps > 0) {
    profile::reset();
    profile::set_enabled(true);
    const auto t0 = Clock::now();
    for (int64_t i = 0; i < o.profile_steps; ++i) step();
    prof_total = std::chrono::duration<double>(Clock::now() - t0).count() / double(o.profile_steps);
    profile::set_enabled(false);
    double covered = 0;
    for (int c = 0; c < static_cast<int>(profile::Category::kCount); ++c) {
      const auto cat = static_cast<profile::Category>(c);
      const double s = profile::seconds(cat) / double(o.profile_steps);
      covered += s;
      prof.push_back({{"category", profile::category_name(cat)},
                      {"seconds", s},
                      {"calls", profile::calls(cat) / o.profile_steps}});
    }
    prof.push_back({{"category", "other (model glue, allocation, copies)"},
                    {"seconds", std::max(0.0, prof_total - covered)},
                    {"calls", 0}});
    profile::reset();
  }

  const ParamCounts pc = count_parameters(m);
  json r = {{"config", cfg.name},
            {"path", path},
            {"parameters", pc.total_with_mtp()},
            {"active_parameters", pc.active()},
            {"batch", B},
            {"seq", S},
            {"steps", o.steps},
            {"warmup", o.warmup},
            {"flops_per_token", flops_per_token},
            {"seconds", total},
            {"median_step_s", median(times)},
            {"tokens_per_s", tps},
            {"median_tokens_per_s", tokens_per_step / median(times)},
            {"tflops", tflops},
            {"mfu", tflops / peak_tflops},
            {"last_loss", loss},
            {"profile_step_s", prof_total},
            {"profile", prof}};
  if (o.torch) {
    const json t = run_torch(path, o, threads);
    r["torch"] = t;
    if (!t.is_null() && t.value("tokens_per_s", 0.0) > 0) {
      r["ratio"] = tps / t["tokens_per_s"].get<double>();
      r["torch_mfu"] = t["tokens_per_s"].get<double>() * flops_per_token / 1e12 / peak_tflops;
    }
  }
  return r;
}

void print_text(const json& r, double peak, int kthreads, int bthreads) {
  std::printf("\n== %s (%s) ==\n", r["config"].get<std::string>().c_str(), r["path"].get<std::string>().c_str());
  std::printf("  %s parameters (%s active), batch %lld x %lld tokens, %s per token, %lld steps after %lld warm-up\n",
              human_count(r["parameters"].get<double>()).c_str(),
              human_count(r["active_parameters"].get<double>()).c_str(), r["batch"].get<long long>(),
              r["seq"].get<long long>(), human_flops(r["flops_per_token"].get<double>()).c_str(),
              r["steps"].get<long long>(), r["warmup"].get<long long>());
  const double tps = r["tokens_per_s"].get<double>();
  std::printf("  %-10s %12s %12s %10s %8s  %s\n", "", "tokens/s", "step (med)", "GFLOP/s", "MFU", "threads");
  std::printf("  %-10s %12.1f %11.3fs %10.1f %7.1f%%  Kokkos %d + OpenBLAS %d\n", "dsv3", tps,
              r["median_step_s"].get<double>(), r["tflops"].get<double>() * 1e3, 100 * r["mfu"].get<double>(),
              kthreads, bthreads);
  if (r.contains("torch")) {
    const json& t = r["torch"];
    if (t.is_null()) {
      std::printf("  %-10s (the reference did not run; /usr/bin/python3 with torch needed)\n", "PyTorch");
    } else {
      const double ttps = t["tokens_per_s"].get<double>();
      std::printf("  %-10s %12.1f %11.3fs %10.1f %7.1f%%  torch %d (OpenBLAS %d)\n", "PyTorch", ttps,
                  t["median_step_s"].get<double>(), ttps * r["flops_per_token"].get<double>() / 1e9,
                  100 * r.value("torch_mfu", 0.0), t["threads"].get<int>(), bthreads);
      std::printf("  ratio dsv3 / PyTorch: %.2fx (tokens/s)\n", r.value("ratio", 0.0));
    }
  }
  std::printf("  MFU against the measured sgemm peak of %.1f GFLOP/s\n", peak * 1e3);
  const double pt = r["profile_step_s"].get<double>();
  if (pt > 0) {
    std::printf("  profile of one training step (%.3f s, mean of the profiled steps):\n", pt);
    std::printf("    %-40s %10s %7s %8s\n", "category", "ms", "%", "calls");
    for (const json& row : r["profile"]) {
      const double s = row["seconds"].get<double>();
      std::printf("    %-40s %10.1f %6.1f%% %8lld\n", row["category"].get<std::string>().c_str(), s * 1e3,
                  100 * s / pt, row["calls"].get<long long>());
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse(argc, argv);
    const int bthreads = openblas_get_num_threads();
    const int kthreads = kokkos_threads();
    const double peak = measure_sgemm_tflops(1024, 5);
    json all = {{"host_backend", host_backend_description()},
                {"kokkos_threads", kthreads},
                {"openblas_threads", bthreads},
                {"torch_threads", bthreads},
                {"sgemm_peak_tflops", peak},
                {"results", json::array()}};
    if (!o.json_out)
      std::printf("dsv3-bench: %s; Kokkos threads %d, OpenBLAS threads %d, PyTorch threads %d\n"
                  "  measured sgemm peak (1024^3, best of 5): %.1f GFLOP/s\n",
                  host_backend_description().c_str(), kthreads, bthreads, bthreads, peak * 1e3);
    for (const std::string& c : o.configs) {
      const json r = bench_config(c, o, peak, bthreads);
      all["results"].push_back(r);
      if (!o.json_out) {
        print_text(r, peak, kthreads, bthreads);
        std::fflush(stdout);
      }
    }
    if (o.json_out) std::cout << all.dump(2) << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3-bench: %s\n", e.what());
    return 1;
  }
}
