// dsv3-bench: CPU training throughput of the model against the PyTorch reference, MFU against the
// measured sgemm peak, and a per-category profile of one training step.
#include <cblas.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend_info.hpp"
#include "config/accounting.hpp"
#include "config/config.hpp"
#include "config/cost.hpp"
#include "core/cli.hpp"
#include "core/error.hpp"
#include "core/format.hpp"
#include "host/host_common.hpp"
#include "model/model.hpp"
#include "profile.hpp"
#include "train/launch.hpp"
#include "train/metrics.hpp"
#include "train/optimizer.hpp"
#include "train/trainer.hpp"

extern "C" int openblas_get_num_threads(void);

namespace {

using namespace dsv3;
using Clock = std::chrono::steady_clock;
using nlohmann::json;
namespace fs = std::filesystem;

struct Options {
  int64_t steps = 5, warmup = 2, profile_steps = 2;
  std::vector<std::string> configs;
  bool torch = true, json_out = false;
  bool precisions = false;  // fp32, bf16 and bf16 + FP8 side by side instead of the PyTorch comparison
  bool recompute = false;   // every recompute policy side by side, against the planner's cost model
};

// The recompute policies --recompute compares.
const std::vector<std::pair<std::string, std::vector<std::string>>> kRecomputePolicies = {
    {"none", {"training.recompute=none"}},
    {"norms", {"training.recompute=selective", "training.recompute_modules=[norms]"}},
    {"swiglu", {"training.recompute=selective", "training.recompute_modules=[swiglu]"}},
    {"mla_up_proj", {"training.recompute=selective", "training.recompute_modules=[mla_up_proj]"}},
    {"selective", {"training.recompute=selective"}},
    {"full", {"training.recompute=full"}}};

// Streaming bandwidth of this machine (GB/s): the best of 3 copies of 256 MiB, read + write counted.
double measure_copy_gbps() {
  const size_t n = size_t(64) << 20;
  std::vector<float> a(n, 1.0f), b(n, 0.0f);
  double best = 0;
  for (int r = 0; r < 3; ++r) {
    const auto t0 = Clock::now();
    std::copy(a.begin(), a.end(), b.begin());
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, 2.0 * double(n) * sizeof(float) / s / 1e9);
    a[r] = b[n - 1 - r];  // keep the copies observable
  }
  return best;
}

// The numerics --precisions compares (tokens/s of each, same model and shapes).
const std::vector<std::pair<std::string, std::vector<std::string>>> kPrecisions = {
    {"fp32", {"training.precision=fp32"}},
    {"bf16", {"training.precision=bf16"}},
    {"bf16+fp8",
     {"training.precision=bf16", "training.use_fp8=true", "model.mla.use_fp8_kv=true",
      "model.moe.deep_ep_fp8=true"}}};

const char* kUsage =
    "usage: dsv3-bench [--steps N] [--warmup W] [--profile-steps P] [--config PATH] [--no-torch] [--json]\n"
    "       dsv3-bench --precisions [--steps N] [--warmup W] [--config PATH] [--json]\n"
    "       dsv3-bench --recompute [--steps N] [--warmup W] [--config PATH] [--json]\n"
    "       dsv3-bench --grid --data PREFIX [--config NAME] [--family dp|tp|pp|ep|4d] [--scaling "
    "strong|weak]\n"
    "                  [--batch B] [--micro-batch M] [--steps N] [--warmup W] [--peak-tflops X]\n"
    "                  [--set key=value ...] [--json] [--json-out FILE] [--verbose]\n"
    "       dsv3-bench --checkpoint --dir DIR [--config NAME] [--set key=value ...] [--reps R]\n"
    "                  [--no-async] [--json] [--json-out FILE]\n"
    "       dsv3-bench --grad-errors --config NAME --data PREFIX [--checkpoint FILE] [--batches N]\n"
    "                  [--set key=value ...] [--json]\n"
    "  --grad-errors: the loss and gradient of bf16 and of each FP8 part alone (Fprop, Dgrad, Wgrad,\n"
    "  attention GEMMs, FFN/expert GEMMs, KV cache, dispatch) against fp32 at the same weights and\n"
    "  tokens (tools/bench_grad_errors.cpp).\n"
    "  --checkpoint: checkpoint save and load speed of a real model against a raw 1 MiB-block write +\n"
    "  fsync of as many bytes on the same disk, and the stall of a background save "
    "(tools/bench_checkpoint.cpp).\n"
    "  --grid: under mpirun/srun, trains the config (default tiny) on the grid of all ranks through the\n"
    "  trainer and reports tokens/s, MFU and the step time split into compute, communication and\n"
    "  pipeline bubble (medians and shares over the N steps after W warm-up steps). The layout comes from\n"
    "  the family and the rank count n: dp (dp=n), tp (tp=n), pp (pp=n), ep (ep=dp=n), 4d (tp 2, then\n"
    "  pp 2, then dp with ep=dp); or from --set parallel.* with --family config. Global batch: B\n"
    "  sequences (strong scaling, default 16) or B x n (weak scaling, B per rank, default 2).\n"
    "\n"
    "  Trains each config for W untimed and N timed steps (forward_backward + AdamW on random tokens,\n"
    "  micro_batch_size x seq_length tokens per step), then P profiled steps; runs the PyTorch reference\n"
    "  (tests/reference/bench_torch.py) on the same shapes with the same thread count.\n"
    "  --precisions: the same training steps in fp32, bf16 and bf16 + FP8 (FP8 GEMMs, KV cache and\n"
    "  dispatch; the host's FP8 GEMMs are the exact reference, not a fast path), tokens/s side by side.\n"
    "  --recompute: the same training steps (fp32) under every recompute policy and each selective module\n"
    "  alone, tokens/s side by side with the step-time ratio the planner's cost model predicts (its\n"
    "  compute and recompute terms, at this machine's measured sgemm rate, the none run's MFU and its\n"
    "  measured copy bandwidth).\n"
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
    else if (a == "--precisions")
      o.precisions = true;
    else if (a == "--recompute")
      o.recompute = true;
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
                          std::string(DSV3_SOURCE_DIR) + "/tests/reference/bench_torch.py' --config '" +
                          config + "' --steps " + std::to_string(o.steps) + " --warmup " +
                          std::to_string(o.warmup) + " --threads " + std::to_string(threads);
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

json bench_config(const std::string& path, const Options& o, double peak_tflops, int threads,
                  const std::vector<std::string>& overrides = {"training.precision=fp32"}) {
  const Config cfg = load_config(path, overrides);
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
  std::printf("\n== %s (%s) ==\n", r["config"].get<std::string>().c_str(),
              r["path"].get<std::string>().c_str());
  std::printf(
      "  %s parameters (%s active), batch %lld x %lld tokens, %s per token, %lld steps after %lld warm-up\n",
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

// ---- --grid: throughput of the trainer on the TP x PP x EP x DP grid of MPI ranks ---------------------

struct GridOptions {
  std::string config = "tiny", family = "dp", scaling = "strong", data, json_out;
  std::vector<std::string> overrides;
  int64_t batch = 0, micro = 0, steps = 20, warmup = 5;
  double peak_tflops = 0;
  bool json = false, verbose = false;
};

GridOptions parse_grid(int argc, char** argv) {
  GridOptions g;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      DSV3_CHECK(i + 1 < argc, a, " needs a value\n", kUsage);
      return argv[++i];
    };
    if (a == "--grid")
      continue;
    else if (a == "--config")
      g.config = value();
    else if (a == "--family")
      g.family = value();
    else if (a == "--scaling")
      g.scaling = value();
    else if (a == "--data")
      g.data = value();
    else if (a == "--set")
      g.overrides.push_back(value());
    else if (a == "--batch")
      g.batch = parse_count(a, value(), 1);
    else if (a == "--micro-batch")
      g.micro = parse_count(a, value(), 1);
    else if (a == "--steps")
      g.steps = parse_count(a, value(), 1);
    else if (a == "--warmup")
      g.warmup = parse_count(a, value(), 0);
    else if (a == "--peak-tflops")
      g.peak_tflops = cli::parse_double(a, value());
    else if (a == "--json")
      g.json = true;
    else if (a == "--json-out")
      g.json_out = value();
    else if (a == "--verbose")
      g.verbose = true;
    else
      raise("unknown option '", a, "' for --grid\n", kUsage);
  }
  DSV3_CHECK(g.family == "dp" || g.family == "tp" || g.family == "pp" || g.family == "ep" ||
                 g.family == "4d" || g.family == "config",
             "--family '", g.family, "': choose dp, tp, pp, ep, 4d or config");
  DSV3_CHECK(g.scaling == "strong" || g.scaling == "weak", "--scaling '", g.scaling,
             "': choose strong or weak");
  if (g.batch == 0) g.batch = g.scaling == "strong" ? 16 : 2;
  return g;
}

// The layout of a family on n ranks, as --set pairs.
std::vector<std::string> family_layout(const std::string& family, int64_t n, int64_t experts) {
  int64_t tp = 1, pp = 1, ep = 1;
  if (family == "tp") tp = n;
  if (family == "pp") pp = n;
  if (family == "ep") ep = n;
  if (family == "4d") {
    tp = std::min<int64_t>(2, n);
    pp = std::min<int64_t>(2, n / tp);
    const int64_t dp = n / (tp * pp);
    ep = experts > 0 && experts % dp == 0 ? dp : 1;
  }
  if (family == "config") return {};
  return {"parallel.tp=" + std::to_string(tp), "parallel.pp=" + std::to_string(pp),
          "parallel.ep=" + std::to_string(ep), "parallel.dp=0"};
}

std::string host_of(const std::string& placement) {
  const size_t b = placement.find("host ") + 5, e = placement.find(',', b);
  return placement.substr(b, e == std::string::npos ? std::string::npos : e - b);
}

int run_grid(int argc, char** argv) {
  MpiRuntime mpi(&argc, &argv);
  const bool root = mpi.world_rank() == 0;
  GridOptions g;
  json rec = {{"mode", "grid"}, {"ranks", mpi.world_size()}};
  auto emit = [&](const json& r) {
    if (!root) return;
    if (!g.json_out.empty()) {
      std::ofstream f(g.json_out);
      f << r.dump(2) << "\n";
      DSV3_CHECK(f.good(), g.json_out, ": cannot write");
    }
    if (g.json) std::cout << r.dump(2) << std::endl;
  };
  try {
    g = parse_grid(argc, argv);
    rec["config"] = g.config, rec["family"] = g.family, rec["scaling"] = g.scaling;
    const int64_t n = mpi.world_size();
    const Config base = load_config(resolve_config_path(g.config), g.overrides);
    std::vector<std::string> sets = g.overrides;
    for (const auto& kv : family_layout(g.family, n, base.model.moe.num_experts)) sets.push_back(kv);
    // Batch: B sequences (strong) or B per rank (weak); the micro-batch is the largest <= the asked
    // one that splits the global batch over the data-parallel ranks.
    const int64_t global = g.scaling == "strong" ? g.batch : g.batch * n;
    sets.push_back("training.global_batch_size=" + std::to_string(global));
    sets.push_back("training.train_steps=" + std::to_string(g.steps + g.warmup));
    sets.push_back("training.eval_interval=0");
    sets.push_back("checkpoint.interval=1000000000");
    int64_t micro = g.micro ? g.micro : base.training.micro_batch_size;
    {
      MpiComm world(MPI_COMM_WORLD, "world", /*owned=*/false);
      check_collectively(
          [&] {
            std::vector<std::string> probe = sets;
            probe.push_back("training.micro_batch_size=1");  // any global batch is a multiple of 1
            const Config c = load_config(resolve_config_path(g.config), probe);
            const int64_t tp_pp = c.parallel.tp * c.parallel.pp;
            DSV3_CHECK(n % tp_pp == 0, "tp*pp = ", tp_pp, " does not divide ", n, " ranks");
            const int64_t dp = n / tp_pp;
            while (micro > 1 && global % (micro * dp) != 0) --micro;
          },
          world);
    }
    sets.push_back("training.micro_batch_size=" + std::to_string(micro));

    const GridRun run = form_grid(g.config, sets, static_cast<int>(n));
    const Layout& l = run.layout;
    rec["layout"] = {{"tp", l.tp},
                     {"pp", l.pp},
                     {"ep", l.ep},
                     {"dp", l.dp},
                     {"zero_stage", l.zero_stage},
                     {"virtual_stages", l.virtual_stages}};
    // Nodes and ranks per node from the hosts the ranks run on.
    std::map<std::string, int> per_host;
    if (root)  // the placements live on rank 0
      for (const auto& p : run.placements) ++per_host[host_of(p)];
    int rpn = 0;
    for (const auto& [h, c] : per_host) rpn = std::max(rpn, c);
    const int cores = static_cast<int>(std::thread::hardware_concurrency());
    const int threads = openblas_get_num_threads();
    if (root && g.verbose) std::cout << describe_grid(run) << std::flush;

    // A run directory of rank 0's choosing (only rank 0 writes there: config.yaml, metrics.jsonl).
    std::string run_dir = (fs::temp_directory_path() / ("dsv3-bench-" + std::to_string(getpid()))).string();
    {
      int64_t len = static_cast<int64_t>(run_dir.size());
      MPI_Bcast(&len, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
      run_dir.resize(static_cast<size_t>(len));
      MPI_Bcast(run_dir.data(), static_cast<int>(len), MPI_CHAR, 0, MPI_COMM_WORLD);
    }
    TrainerOptions opt;
    opt.comms = run.trainer_comms();
    opt.data = g.data;
    opt.run_dir = run_dir;
    opt.resume = "none";
    opt.final_checkpoint = false;
    opt.peak_tflops = g.peak_tflops;
    std::ostringstream quiet;
    opt.log = g.verbose ? &std::cout : &quiet;
    const TrainSummary sum = train(run.cfg, opt);
    std::error_code ec;
    if (root) fs::remove_all(run_dir, ec);

    std::vector<double> step_s, tps, mfu;
    double tot = 0, comm = 0, bubble = 0;
    for (size_t i = static_cast<size_t>(g.warmup); i < sum.timings.size(); ++i) {
      const StepTiming& t = sum.timings[i];
      step_s.push_back(t.step_s), tps.push_back(t.tokens_per_s), mfu.push_back(t.mfu);
      tot += t.step_s, comm += t.comm_s, bubble += t.bubble_s;
    }
    DSV3_CHECK(!step_s.empty(), "no measured steps (", sum.timings.size(), " run, ", g.warmup, " warm-up)");
    const double ms = double(step_s.size());
    const double flops = training_flops_per_token(run.cfg.model, run.cfg.training.seq_length).total();
    rec["nodes"] = per_host.size();
    rec["ranks_per_node"] = rpn;
    rec["cores_per_node"] = cores;
    rec["threads_per_rank"] = threads;
    rec["oversubscribed"] = rpn * threads > cores;
    rec["global_batch"] = global;
    rec["micro_batch"] = micro;
    rec["seq"] = run.cfg.training.seq_length;
    rec["tokens_per_step"] = global * run.cfg.training.seq_length;
    rec["steps"] = g.steps;
    rec["warmup"] = g.warmup;
    rec["flops_per_token"] = flops;
    // tokens/s of the median step; MFU scales with it (the peak is the same for every step).
    const double tokens_per_step = double(global * run.cfg.training.seq_length);
    const double med_tps = tokens_per_step / median(step_s), med_mfu = med_tps * mfu.front() / tps.front();
    rec["tokens_per_s"] = med_tps;
    rec["step_time_s"] = median(step_s);
    rec["mfu"] = med_mfu;
    rec["compute_s"] = (tot - comm - bubble) / ms;
    rec["comm_s"] = comm / ms;
    rec["bubble_s"] = bubble / ms;
    rec["compute_share"] = (tot - comm - bubble) / tot;
    rec["comm_share"] = comm / tot;
    rec["bubble_share"] = bubble / tot;
    rec["first_loss"] = sum.losses.front();
    rec["last_loss"] = sum.losses.back();
    if (root && !g.json)
      std::printf(
          "dsv3-bench --grid: %s, %lld ranks (%s, %zu node(s), %d per node on %d cores%s), tp=%lld pp=%lld "
          "ep=%lld dp=%lld, global batch %lld x %lld: %.0f tokens/s, step %.3f s = compute %.1f%% + comm "
          "%.1f%% + bubble %.1f%%, MFU %.2f%%\n",
          run.cfg.name.c_str(), static_cast<long long>(n), g.family.c_str(), per_host.size(), rpn, cores,
          rpn * threads > cores ? ", oversubscribed" : "", static_cast<long long>(l.tp),
          static_cast<long long>(l.pp), static_cast<long long>(l.ep), static_cast<long long>(l.dp),
          static_cast<long long>(global), static_cast<long long>(run.cfg.training.seq_length), med_tps,
          median(step_s), 100 * (tot - comm - bubble) / tot, 100 * comm / tot, 100 * bubble / tot,
          100 * med_mfu);
    emit(rec);
    return 0;
  } catch (const QuietExit&) {
    return 2;
  } catch (const std::exception& e) {
    // A layout the config does not admit on this many ranks (or any other error): one record saying
    // so, which the scaling report lists as skipped.
    if (root || !dynamic_cast<const CollectiveError*>(&e))
      std::fprintf(stderr, "dsv3-bench: rank %d: %s\n", mpi.world_rank(), e.what());
    rec["error"] = e.what();
    try {
      emit(rec);
    } catch (const std::exception&) {
    }
    if (mpi.world_size() > 1 && !dynamic_cast<const CollectiveError*>(&e)) MPI_Abort(MPI_COMM_WORLD, 2);
    return 2;
  }
}
}  // namespace

namespace dsv3 {
int run_checkpoint_bench(int argc, char** argv);   // tools/bench_checkpoint.cpp
int run_grad_errors_bench(int argc, char** argv);  // tools/bench_grad_errors.cpp
}  // namespace dsv3

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--grid") return run_grid(argc, argv);
    if (std::string(argv[i]) == "--checkpoint") return dsv3::run_checkpoint_bench(argc, argv);
    if (std::string(argv[i]) == "--grad-errors") return dsv3::run_grad_errors_bench(argc, argv);
  }
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
      std::printf(
          "dsv3-bench: %s; Kokkos threads %d, OpenBLAS threads %d, PyTorch threads %d\n"
          "  measured sgemm peak (1024^3, best of 5): %.1f GFLOP/s\n",
          host_backend_description().c_str(), kthreads, bthreads, bthreads, peak * 1e3);
    if (o.recompute) {
      Options q = o;
      q.torch = false, q.profile_steps = 0;
      const double copy_gbps = measure_copy_gbps();
      all["copy_gbps"] = copy_gbps;
      if (!o.json_out) std::printf("  measured copy bandwidth (256 MiB): %.1f GB/s\n", copy_gbps);
      for (const std::string& c : o.configs) {
        json rows = json::array();
        for (const auto& [name, sets] : kRecomputePolicies) {
          std::vector<std::string> s = sets;
          s.push_back("training.precision=fp32");
          json r = bench_config(c, q, peak, bthreads, s);
          r["policy"] = name;
          rows.push_back(r);
        }
        // The cost model on this machine: one rank, compute at the none run's achieved rate.
        Config cfg = load_config(c, {"training.precision=fp32"});
        cfg.hardware.peak_tflops = peak;
        cfg.hardware.assumed_mfu = std::min(1.0, rows[0]["mfu"].get<double>());
        cfg.training.global_batch_size = cfg.training.micro_batch_size;
        HardwareSpec hs = hardware_spec(cfg.hardware);
        hs.hbm_gbps = copy_gbps;
        Layout one;
        double predicted_base = 0;
        for (size_t i = 0; i < rows.size(); ++i) {
          const Config ci = load_config(c, [&] {
            std::vector<std::string> s = kRecomputePolicies[i].second;
            s.push_back("training.precision=fp32");
            return s;
          }());
          const StepCost sc = step_cost(cfg, one, recompute_set(ci.training), hs);
          if (i == 0) predicted_base = sc.step_s;
          rows[i]["predicted_ratio"] = sc.step_s / predicted_base;
          rows[i]["measured_ratio"] =
              rows[0]["tokens_per_s"].get<double>() / rows[i]["tokens_per_s"].get<double>();
        }
        all["results"].push_back({{"config", c}, {"recompute", rows}});
        if (o.json_out) continue;
        std::printf("\n== %s: %lld x %lld tokens per step, %lld steps after %lld warm-up (fp32) ==\n",
                    c.c_str(), rows[0]["batch"].get<long long>(), rows[0]["seq"].get<long long>(),
                    (long long)o.steps, (long long)o.warmup);
        std::printf("  %-12s %12s %12s %14s %15s %12s\n", "recompute", "tokens/s", "step (med)",
                    "time vs none", "cost model", "model/meas.");
        for (const json& r : rows)
          std::printf("  %-12s %12.1f %11.3fs %13.3fx %14.3fx %12.3f\n",
                      r["policy"].get<std::string>().c_str(), r["tokens_per_s"].get<double>(),
                      r["median_step_s"].get<double>(), r["measured_ratio"].get<double>(),
                      r["predicted_ratio"].get<double>(),
                      r["predicted_ratio"].get<double>() / r["measured_ratio"].get<double>());
        std::fflush(stdout);
      }
      if (o.json_out) std::cout << all.dump(2) << std::endl;
      return 0;
    }
    if (o.precisions) {
      Options q = o;
      q.torch = false, q.profile_steps = 0;
      for (const std::string& c : o.configs) {
        json rows = json::array();
        for (const auto& [name, sets] : kPrecisions) {
          json r = bench_config(c, q, peak, bthreads, sets);
          r["precision"] = name;
          rows.push_back(r);
        }
        all["results"].push_back({{"config", c}, {"precisions", rows}});
        if (o.json_out) continue;
        std::printf("\n== %s: %lld x %lld tokens per step, %lld steps after %lld warm-up ==\n", c.c_str(),
                    rows[0]["batch"].get<long long>(), rows[0]["seq"].get<long long>(), (long long)o.steps,
                    (long long)o.warmup);
        std::printf("  %-10s %12s %12s %10s %10s %12s\n", "precision", "tokens/s", "step (med)", "vs fp32",
                    "GFLOP/s", "last loss");
        const double base = rows[0]["tokens_per_s"].get<double>();
        for (const json& r : rows)
          std::printf("  %-10s %12.1f %11.3fs %9.2fx %10.1f %12.4f\n",
                      r["precision"].get<std::string>().c_str(), r["tokens_per_s"].get<double>(),
                      r["median_step_s"].get<double>(), r["tokens_per_s"].get<double>() / base,
                      r["tflops"].get<double>() * 1e3, r["last_loss"].get<double>());
        std::fflush(stdout);
      }
      if (o.json_out) std::cout << all.dump(2) << std::endl;
      return 0;
    }
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
